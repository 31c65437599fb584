"""Example stage `caption-stats`: per filter shard, each caption's length in words and characters.

The worked example of docs/adding-a-stage.md: one module (this file) plus one line in
pipelines/core/registry.py STAGES. tests/pipelines/core/test_example_stage.py registers it and
runs it through the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from storage.fs import DataRoot
from storage.manifest import list_manifests, upstream_ref


@dataclass(frozen=True)
class CaptionStatsConfig(StageConfig):
    """Section [caption_stats] (derived from the stage name)."""

    min_words: int = 1  # captions with fewer words are dropped (counted as "short_caption")

    def __post_init__(self) -> None:
        self.check(self.min_words >= 0, "min_words", "must be >= 0")  # exit 2, names the field


class CaptionStatsStage(Stage):
    name = "caption-stats"  # CLI name, flow `racm3-caption-stats`, folder <root>/caption-stats/
    config = CaptionStatsConfig
    version = "1"  # bump when the output for the same inputs and params changes
    description = "caption length in words and characters, per filter shard"

    def plan(self, root: DataRoot, cfg: CaptionStatsConfig) -> list[ShardSpec]:
        """One output shard per upstream filter shard, keyed by that shard's output digest."""
        ids = sorted(m.shard_id for m in list_manifests(root, "filter"))
        if not ids:
            raise FileNotFoundError("no filter shards: run `racm3 run filter` first")
        return [ShardSpec(self.name, sid, (upstream_ref(root, "filter", sid),)) for sid in ids]

    def run_shard(self, ctx: ShardContext, resources: None) -> ShardResult:
        t = ctx.read_input(0, columns=["key", "caption"])
        words = pc.list_value_length(pc.utf8_split_whitespace(t["caption"]))
        out = pa.table({"key": t["key"], "words": words.cast(pa.int32()),
                        "chars": pc.utf8_length(t["caption"]).cast(pa.int32())})
        out = out.filter(pc.greater_equal(out["words"], ctx.cfg.min_words))
        ctx.write_table(out)  # a temp file, renamed into place only when the shard succeeds
        short = t.num_rows - out.num_rows
        return ShardResult(rows_in=t.num_rows, rows_out=out.num_rows,
                           dropped={"short_caption": short} if short else {})
