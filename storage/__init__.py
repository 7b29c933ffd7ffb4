"""Where and how the pipeline's artifacts live. No other package builds a path by hand."""

from storage.digests import code_digest, sha256_bytes, sha256_json, sha256_stream
from storage.store import DEFAULT_STORE, STORE_ENV, Store, StoreError

__all__ = ["code_digest", "DEFAULT_STORE", "STORE_ENV", "Store", "StoreError", "sha256_bytes", "sha256_json", "sha256_stream"]
