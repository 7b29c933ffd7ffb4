"""Content digests: the identity of every artifact the pipeline stores or caches on."""

from __future__ import annotations

import hashlib
import json
from typing import IO, Any

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(stream: IO[bytes]) -> tuple[str, int]:
    """Digest and size of a binary stream, read in chunks so a 47 MB file never sits in memory twice."""
    h = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def sha256_json(obj: Any) -> str:
    """Digest of a JSON-able value in canonical form, so equal parameters give equal keys."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())
