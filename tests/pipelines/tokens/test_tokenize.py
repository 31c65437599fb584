"""tokenize on generated download shards: the token shard contract, bad input, skip-on-rerun, decode."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from model.document import Vocab
from pipelines.core.config import ConfigError
from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.runner import run_stage
from pipelines.core.stage import ShardSpec, execute_shard
from pipelines.demo.fit_vqgan import FitVQGANConfig
from pipelines.tokens.tokenize import (
    TOKEN_SHARD,
    TokenizeConfig,
    decode_key,
    read_token_meta,
)
from pipelines.tokens.tokenizers import load_tokenizers
from storage.fs import DataRoot
from storage.manifest import read_manifest
from storage.shards import read_table
from tests.factories import _FixedTable, download_table, make_download_shard

FIT = FitVQGANConfig(image_size=16, factor=4, codebook_size=16, channels=8, embed_dim=4,
                     max_steps=2, batch_size=8, holdout_fraction=0.2, bpe_vocab_size=64, threads=1)
TOK = TokenizeConfig(image_size=16, factor=4, codebook_size=16, batch_size=4)


def cfgs(tok: TokenizeConfig = TOK) -> dict:
    return {"fit_vqgan": FIT, "tokenize": tok, "run": RunConfig(retries=0),
            "beam": BeamConfig(direct_num_workers=1)}  # in-process: no torch import per worker


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> DataRoot:
    """Two download shards (one with 2 failed downloads and 1 corrupt JPEG), a fitted tiny VQGAN + BPE."""
    root = DataRoot(str(tmp_path_factory.mktemp("tok")))
    t = download_table(10, failures=2, size=64).to_pylist()
    t[3]["jpg"] = b"not a jpeg"
    execute_shard(_FixedTable(pa.Table.from_pylist(t, schema=download_table(0).schema)), root, None,
                  ShardSpec("download", "00000", ()))
    make_download_shard(root, "00001", n=6, start=12, size=64)
    assert run_stage("fit-vqgan", root, cfgs()).ok
    report = run_stage("tokenize", root, cfgs())
    assert report.ok, report.failed
    return root


def test_token_shard_contract(root):
    t = read_table(root, root.artifact("tokenize", "00000", "parquet"))
    assert t.schema.equals(TOKEN_SHARD)
    assert t.num_rows == 9 and "000000003" not in t["key"].to_pylist()
    codes = np.array(t["image_codes"].to_pylist())
    assert codes.shape == (9, 16) and codes.max() < 16
    m = read_manifest(root, "tokenize", "00000")
    assert m.rows_in == 12 and m.rows_out == 9
    assert m.dropped == {"failed_download": 2, "undecodable_image": 1}
    assert m.metrics["n_image"] == 16 and m.metrics["grid"] == 4 and m.metrics["codebook"]


def test_codes_equal_a_direct_encode_and_captions_round_trip(root):
    tok = load_tokenizers(root, TOK)
    t = read_table(root, root.artifact("tokenize", "00001", "parquet")).to_pylist()
    src = read_table(root, root.artifact("download", "00001", "parquet")).to_pylist()
    from model.images import load_image, to_tensor

    img = load_image(src[0]["jpg"], 16)[None]
    assert tok.vqgan.encode(to_tensor(img)).flatten().tolist() == t[0]["image_codes"]
    assert tok.text.decode(t[0]["caption_ids"]) == src[0]["caption"]
    meta = read_token_meta(root)
    assert meta.vocab == Vocab(tok.text.vocab_size, 16) and meta.grid == 4
    ids = meta.vocab.encode(t[0]["caption_ids"], t[0]["image_codes"])
    assert meta.vocab.decode(ids) == (t[0]["caption_ids"], t[0]["image_codes"])


def test_rerun_skips_and_new_weights_retokenize(root):
    assert sorted(run_stage("tokenize", root, cfgs()).skipped) == ["00000", "00001"]
    assert run_stage("tokenize", root, cfgs(dataclasses.replace(TOK, batch_size=2))).ran == []
    refit = {**cfgs(), "fit_vqgan": dataclasses.replace(FIT, seed=1)}
    assert run_stage("fit-vqgan", root, refit).ran == ["vqgan"]
    assert sorted(run_stage("tokenize", root, refit).ran) == ["00000", "00001"]


def test_mismatched_codebook_is_refused(root):
    """Refused when the stage is planned, before any shard is touched (the CLI exits 2)."""
    before = read_manifest(root, "tokenize", "00000")
    with pytest.raises(ConfigError, match=r"tokenize\.codebook_size.*codebook size 16"):
        run_stage("tokenize", root, cfgs(dataclasses.replace(TOK, codebook_size=32)), force=True)
    assert read_manifest(root, "tokenize", "00000") == before


def test_mixed_token_shards_are_refused(root):
    path = root.manifest_path("tokenize", "00001")
    m = read_manifest(root, "tokenize", "00001")
    m.metrics["codebook"] = "someotherbook"
    from storage.manifest import write_manifest

    write_manifest(root, m)
    try:
        with pytest.raises(ValueError, match="disagree on codebook"):
            read_token_meta(root)
    finally:
        m.metrics["codebook"] = read_manifest(root, "tokenize", "00000").metrics["codebook"]
        write_manifest(root, m)
    assert root.exists(path)


def test_decode_key_writes_side_by_side_png(root, tmp_path):
    out = decode_key(root, cfgs(), "000000001", str(tmp_path / "doc.png"), scale=4)
    img = Image.open(out)
    assert img.size == (2 * 16 * 4, 16 * 4)
    with pytest.raises(KeyError, match="no token shard"):
        decode_key(root, cfgs(), "000000010", str(tmp_path / "x.png"))  # a failed download


def test_missing_checkpoint_names_the_file(tmp_path):
    root = DataRoot(str(tmp_path))
    make_download_shard(root, "00000", n=2, size=64)
    cfg = dataclasses.replace(TOK, checkpoint=str(tmp_path / "weights" / "vqgan.ckpt"))
    with pytest.raises(FileNotFoundError, match="vqgan.ckpt"):
        run_stage("tokenize", root, cfgs(cfg))


@pytest.mark.parametrize("bad", ["disagree", "unknown_family"])
def test_cli_refuses_bad_tokenizer_before_writing(tmp_path, capsys, bad):
    """`racm3 run tokenize` with a yaml that disagrees with its tensors, or names an unknown
    family: exit 2, the field named, no token shard written."""
    from flows.cli import main
    from storage.manifest import list_manifests
    from tests.model.vq_taming import ddconfig, random_taming, save_taming

    root = DataRoot(str(tmp_path / "root"))
    make_download_shard(root, "00000", n=3, size=32)
    dd = ddconfig(32, [1, 2], [])
    kw = {"yaml_n_embed": 32} if bad == "disagree" else {"target": "ldm.models.autoencoder.AutoencoderKL"}
    ckpt = save_taming(random_taming(dd, 16, 4), dd, 16, 4, tmp_path / "vq.ckpt", **kw)
    rc = main(["run", "tokenize", "--local", "--data-root", root.uri, "--set",
               f"tokenize.checkpoint={ckpt}", "--set", "tokenize.text_tokenizer=openclip"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "tokenize.vqgan_config" in err and ("model.params.n_embed" in err if bad == "disagree"
                                               else "model.target" in err)
    assert not list_manifests(root, "tokenize") and not root.exists(root.artifact("tokenize", "00000", "parquet"))
