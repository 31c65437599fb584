"""Small generated shards for tests: download shards with real JPEG bytes, under the shard contract.

One generator for tests and benchmarks: it lives in benchmarks/download_shards.py (benchmarks do
not import the tests package); the tests use it from there.
"""

from __future__ import annotations

from benchmarks.download_shards import (  # noqa: F401 - the tests' factory names
    NAMES,
    _FixedTable,
    download_table,
    entity_image,
    jpeg_bytes,
    make_download_shard,
)
