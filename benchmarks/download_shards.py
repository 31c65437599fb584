"""Generated download shards with real JPEG bytes, as the download stage writes them (benchmarks
do not import the tests package)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.core.stage import ShardResult, ShardSpec, Stage, execute_shard
from storage.fs import DataRoot
from storage.schemas import IMAGE_SHARD

NAMES = ["zorvik", "plenta", "quaro", "mistel", "davon", "kelpo", "riftan", "solme"]


def entity_image(entity: int, size: int = 256, seed: int = 0) -> Image.Image:
    """A flag-like 4x4 colour grid unique to `entity` on a noisy background."""
    rng = np.random.default_rng(entity)
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    noise = np.random.default_rng(seed).integers(0, 40, size=(size, size, 3), dtype=np.uint8)
    img = noise.copy()
    cell = size // 6
    off = size // 6
    for i in range(4):
        for j in range(4):
            img[off + i * cell: off + (i + 1) * cell, off + j * cell: off + (j + 1) * cell] = grid[i, j]
    return Image.fromarray(img)


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def download_table(n: int, start: int = 0, failures: int = 0, size: int = 256) -> pa.Table:
    """`n` successful rows of entities start..start+n (8 entities cycling) plus `failures` failed rows."""
    rows = []
    for i in range(start, start + n):
        ent = i % len(NAMES)
        jpg = jpeg_bytes(entity_image(ent, size, seed=i))
        rows.append(dict(key=f"{i:09d}", url=f"http://127.0.0.1/{i}.jpg",
                         caption=f"a photo of the {NAMES[ent]}", status="success",
                         error_message=None, jpg=jpg, width=size, height=size,
                         original_width=size, original_height=size,
                         sha256=hashlib.sha256(jpg).hexdigest(), pwatermark=0.1, punsafe=0.1,
                         similarity=0.3))
    for i in range(start + n, start + n + failures):
        rows.append(dict(key=f"{i:09d}", url=f"http://127.0.0.1/{i}.jpg", caption="broken",
                         status="failed_to_download", error_message="HTTP Error 404: Not Found",
                         jpg=None, width=None, height=None, original_width=None,
                         original_height=None, sha256=None, pwatermark=0.1, punsafe=0.1,
                         similarity=0.3))
    return pa.Table.from_pylist(rows, schema=IMAGE_SHARD)


class _FixedTable(Stage):
    name = "download"
    version = "test"

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def run_shard(self, ctx: object, resources: object) -> ShardResult:
        ctx.write_table(self.table)
        return ShardResult(rows_in=self.table.num_rows, rows_out=self.table.num_rows)


def make_download_shard(root: DataRoot, shard_id: str, n: int, start: int = 0,
                        failures: int = 0, size: int = 256) -> None:
    """Write `download/<shard_id>.parquet` with its manifest, as the download stage would."""
    table = download_table(n, start, failures, size)
    spec = ShardSpec("download", shard_id, ())
    execute_shard(_FixedTable(table), root, None, spec)
