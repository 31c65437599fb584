"""Sub-indexes built in parallel on Beam: one element per part, any runner by its options."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import faiss
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.retrieval.index_build import add_shards, write_index
from storage.fs import DataRoot


class BuildPart(beam.DoFn):
    """Builds sub-index p from the trained template: reads every embedding shard in turn and
    adds the rows hashed to p, then writes it with FAISS's writer to its temp path."""

    def __init__(self, root_uri: str, paths: list[str], blob: bytes, rows: list[int],
                 outs: list[str]):
        self.root_uri, self.paths, self.blob, self.rows, self.outs = (
            root_uri, paths, blob, rows, outs)

    def process(self, p: int) -> Iterator[tuple[int, int]]:
        root = DataRoot(self.root_uri)
        index = faiss.deserialize_index(np.frombuffer(self.blob, dtype=np.uint8))
        add_shards(index, root, self.paths, self.rows[p], p, len(self.rows))
        if index.ntotal != self.rows[p]:
            raise RuntimeError(f"sub-index {p}: {index.ntotal} vectors, expected {self.rows[p]}")
        yield p, write_index(root, self.outs[p], index)


def build_on_beam(root_uri: str, paths: list[str], blob: bytes, rows: list[int],
                  outs: list[str], options: list[str]) -> None:
    """Runs BuildPart for every part; raises if any part failed (the stage then aborts)."""
    with beam.Pipeline(options=PipelineOptions(options)) as p:
        _ = (p | "index:parts" >> beam.Create(list(range(len(rows))))
             | "index:spread" >> beam.Reshuffle()
             | "index:build" >> beam.ParDo(BuildPart(root_uri, paths, blob, rows, outs)))
