"""Credentials in a store URL (``sftp://user:pw@host/x``, ``s3://key:secret@bucket/x``) never travel with it.

A URL is logged, recorded in the ``runs`` table, saved in Prefect's result-storage block, shown in
artifacts and put on a child process's command line; a password inside it would reach all of
those. So the first thing that sees such a URL takes the user info out and hands it to fsspec the
way fsspec reads its own configuration: ``fsspec.config.conf[<protocol>]`` for this process, and
the ``FSSPEC_<PROTOCOL>_<OPTION>`` environment variables for the processes it starts (a backend's
child, a worker's flow run). What is left is the URL without them, which is all anyone sees.
"""

from __future__ import annotations

import os
import urllib.parse

import fsspec.config

# the option names each filesystem takes for a user and a secret (fsspec's storage_options)
CREDENTIAL_OPTIONS: dict[str, tuple[str, str]] = {"s3": ("key", "secret"), "s3a": ("key", "secret")}
DEFAULT_OPTIONS = ("username", "password")  # sftp, ssh, ftp, smb, webdav (webdav4), ...


def strip_credentials(url: str) -> str:
    """``url`` without its user info; the user and password become fsspec options for its protocol."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1 or "@" not in parts.netloc:  # a path, a drive letter, no user info
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    protocol = parts.scheme.lower()
    names = CREDENTIAL_OPTIONS.get(protocol, DEFAULT_OPTIONS)
    for name, value in zip(names, (user, password)):
        if value:
            value = urllib.parse.unquote(value)
            fsspec.config.conf.setdefault(protocol, {})[name] = value
            os.environ[f"FSSPEC_{protocol.upper()}_{name.upper()}"] = value
    return urllib.parse.urlunsplit(parts._replace(netloc=host))
