"""The shard contract: paths, atomic shard IO, manifests and fingerprints, DuckDB views."""

from storage.fs import DataRoot
from storage.manifest import InputRef, Manifest, fingerprint, params_hash

__all__ = ["DataRoot", "InputRef", "Manifest", "fingerprint", "params_hash"]
