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


class CredentialsInUrl(ValueError):
    """A URL holds a user or password where it may not (a deployed run's parameter), or one that cannot be parsed."""


def split_credentials(url: str) -> tuple[str, dict[str, dict[str, str]]]:
    """``url`` without user info, and the fsspec options it held per protocol; no side effect.

    Each link of a chained URL (``simplecache::sftp://user:pw@host/x``) is split. A password holding an
    unencoded ``/``, ``?`` or ``#`` cannot be told from the path: it is refused rather than left in the URL.
    """
    links, options = [], {}
    for link in url.split("::"):
        parts = urllib.parse.urlsplit(link)
        if not parts.scheme or len(parts.scheme) == 1 or "://" not in link:  # a path, a drive letter
            links.append(link)
            continue
        rest = link.split("://", 1)[1]
        if "@" not in parts.netloc:
            if "@" in rest and ":" in rest.split("@", 1)[0]:
                raise CredentialsInUrl(
                    f"The store URL for {parts.scheme}:// holds a user and password that cannot be parsed: "
                    "percent-encode '/', '?' and '#' in the password, or give the credentials through the "
                    "filesystem's own settings (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."
                )
            links.append(link)
            continue
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        protocol = parts.scheme.lower()
        names = CREDENTIAL_OPTIONS.get(protocol, DEFAULT_OPTIONS)
        found = {name: urllib.parse.unquote(value) for name, value in zip(names, (user, password)) if value}
        options.setdefault(protocol, {}).update(found)
        links.append(urllib.parse.urlunsplit(parts._replace(netloc=host)))
    return "::".join(links), options


def has_credentials(url: str) -> bool:
    try:
        return bool(split_credentials(url)[1])
    except CredentialsInUrl:
        return True


def strip_credentials(url: str) -> str:
    """``url`` without its user info; the user and password become fsspec options for its protocol, for
    this process (``fsspec.config.conf``) and the processes it starts (``FSSPEC_<PROTOCOL>_<OPTION>``)."""
    clean, options = split_credentials(url)
    for protocol, found in options.items():
        for name, value in found.items():
            fsspec.config.conf.setdefault(protocol, {})[name] = value
            os.environ[f"FSSPEC_{protocol.upper()}_{name.upper()}"] = value
    return clean
