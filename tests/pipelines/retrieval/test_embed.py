"""Stage `embed` on Beam's local runner over generated download shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from model.clip_encoder import DocEncoder, decode_image
from pipelines.core.runner import run_stage
from pipelines.core.stage import ShardSpec, execute_shard, shard_states
from pipelines.retrieval.embed import EmbedConfig, EmbedStage
from pipelines.retrieval.faiss_index import vectors
from storage.fs import DataRoot
from storage.manifest import read_manifest
from storage.shards import read_table
from tests.factories import _FixedTable, download_table, make_download_shard
from tests.pipelines.retrieval.retrieval_helpers import CKPT, configs, write_checkpoint


@pytest.fixture()
def root(tmp_path) -> DataRoot:
    r = DataRoot(str(tmp_path / "data"))
    write_checkpoint(r)
    make_download_shard(r, "00000", n=6, failures=2, size=64)
    make_download_shard(r, "00001", n=5, start=6, size=64)
    return r


def test_embed_writes_unit_doc_embeddings_and_counts_failures(root):
    report = run_stage("embed", root, configs())
    assert report.ok and sorted(report.ran) == ["00000", "00001"]
    assert report.rows_out == 11 and report.dropped["failed_download"] == 2
    t = read_table(root, root.artifact("embed", "00000", "parquet"))
    assert t.column_names == ["key", "sha256", "text_emb", "image_emb", "doc_emb"]
    assert t.num_rows == 6 and t["key"][0].as_py() == "000000000"
    doc = vectors(t)
    np.testing.assert_allclose(np.linalg.norm(doc, axis=1), 1.0, rtol=1e-5)
    # The stored row is exactly what the encoder gives for that document.
    src = read_table(root, root.artifact("download", "00000", "parquet")).to_pylist()[0]
    enc = DocEncoder.load("racm3-tiny", root.join(CKPT))
    again = enc.encode_docs([src["caption"]], [decode_image(src["jpg"], enc.image_side)])["doc_emb"][0]
    np.testing.assert_allclose(doc[0], again, rtol=1e-4, atol=1e-5)
    m = read_manifest(root, "embed", "00000")
    assert m.metrics["encoder"].startswith("racm3-tiny@") and m.metrics["dim"] == 64


def test_rerun_skips_done_shards_and_new_weights_reembed(root):
    run_stage("embed", root, configs())
    again = run_stage("embed", root, configs())
    assert again.ran == [] and sorted(again.skipped) == ["00000", "00001"]
    write_checkpoint(root, seed=1)  # new weights: every shard is stale
    states = shard_states(EmbedStage(), root, EmbedConfig(checkpoint=CKPT))
    assert {s.state for s in states} == {"stale"}


def test_empty_caption_and_undecodable_image_are_counted(root):
    t = download_table(3, size=64).to_pylist()
    t[0]["caption"] = "  "
    t[1]["jpg"] = b"<html>oops</html>"
    t[2]["caption"], t[2]["jpg"] = "", b"\x00"
    table = pa.Table.from_pylist(t, schema=download_table(0).schema)
    execute_shard(_FixedTable(table), root, None, ShardSpec("download", "00002", ()))
    run_stage("embed", root, configs())
    m = read_manifest(root, "embed", "00002")
    assert m.metrics["missing_part"] == {"empty_caption": 2, "undecodable_image": 2}
    assert m.dropped["no_content"] == 1 and m.rows_out == 2
    out = read_table(root, root.artifact("embed", "00002", "parquet"))
    text, image = vectors(out, "text_emb"), vectors(out, "image_emb")
    assert not text[0].any() and image[0].any()  # image-only doc: missing part stored as zeros
    assert text[1].any() and not image[1].any()


def test_float16_storage(root):
    run_stage("embed", root, configs(embed=EmbedConfig(checkpoint=CKPT, dtype="float16")))
    t = read_table(root, root.artifact("embed", "00001", "parquet"))
    assert t.schema.field("doc_emb").type.value_type == pa.float16()
    np.testing.assert_allclose(np.linalg.norm(vectors(t), axis=1), 1.0, atol=2e-3)


def test_missing_checkpoint_names_the_file(tmp_path):
    r = DataRoot(str(tmp_path / "empty"))
    make_download_shard(r, "00000", n=1, size=32)
    with pytest.raises(FileNotFoundError, match="fit-clip/model.pt"):
        EmbedStage().plan(r, EmbedConfig())


def test_an_empty_download_shard_gives_an_empty_embed_shard(root):
    write_checkpoint(root)
    make_download_shard(root, "00000", n=0)
    make_download_shard(root, "00001", n=0, start=0, failures=2)
    report = run_stage("embed", root, configs())
    assert report.ok, report.failed
    for sid in ("00000", "00001"):
        m = read_manifest(root, "embed", sid)
        assert m.rows_out == 0 and read_table(root, root.artifact("embed", sid, "parquet")).num_rows == 0
