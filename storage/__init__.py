"""Where and how the pipeline's artifacts live. No other package builds a path by hand."""

from storage.credentials import strip_credentials
from storage.digests import code_digest, sha256_bytes, sha256_json, sha256_stream
from storage.files import SIDECAR_LIMIT, STORE_ENV, DamagedArtifact, StoreError, WriteConflict
from storage.keys import Digest, RunId, StoreKey, StoreName, UnsafeKey, confine_key, confine_name, damage
from storage.store import DEFAULT_STORE, Store

__all__ = [
    "code_digest",
    "confine_key",
    "confine_name",
    "damage",
    "DamagedArtifact",
    "DEFAULT_STORE",
    "Digest",
    "RunId",
    "SIDECAR_LIMIT",
    "STORE_ENV",
    "Store",
    "StoreError",
    "StoreKey",
    "StoreName",
    "strip_credentials",
    "UnsafeKey",
    "WriteConflict",
    "sha256_bytes",
    "sha256_json",
    "sha256_stream",
]
