"""Paper-size smoke run: the `paper` preset's shapes (CLIP BPE + 8192-code vocabulary, 1,024
image tokens per document, sequence length 4,096, K up to 2) with a tiny width and depth, a few
steps on CPU through pack and train: nothing in the code may assume the demo's sizes."""

import numpy as np
import pyarrow as pa
import pytest

from pipelines.core.registry import load_config
from pipelines.core.stage import execute_shard
from pipelines.training.checkpoints import load_trained
from pipelines.training.train import TrainStage
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.training.corpus_factory import _Fixed, make_neighbour_shard, pack_corpus

N_TEXT, N_IMAGE, IMAGE_TOKENS = 49_408, 8_192, 1_024  # open_clip BPE, f8 VQGAN 32 x 32


def paper_token_shard(root: DataRoot, shard_id: str, keys: list[str]) -> None:
    from pipelines.core.stage import ShardSpec

    rng = np.random.default_rng(int(shard_id))
    caps = [rng.integers(0, N_TEXT, rng.integers(5, 40)).astype(np.int32).tolist() for _ in keys]
    imgs = [rng.integers(0, N_IMAGE, IMAGE_TOKENS).astype(np.uint16).tolist() for _ in keys]
    table = pa.table({"key": keys, "caption": ["c"] * len(keys),
                      "caption_ids": pa.array(caps, pa.list_(pa.int32())),
                      "image_codes": pa.array(imgs, pa.list_(pa.uint16()))})
    metrics = dict(codebook="vqgan-f8-8192", text_tokenizer="openclip", n_text=N_TEXT,
                   n_image=N_IMAGE, grid=32)
    execute_shard(_Fixed("tokenize", table, metrics), root, None, ShardSpec("tokenize", shard_id, ()))


@pytest.mark.slow
def test_paper_shapes_train_a_few_steps_on_cpu(tmp_path):
    root = DataRoot(str(tmp_path))
    keys = [f"{i:04d}" for i in range(8)]
    for s in range(2):
        paper_token_shard(root, f"{s:05d}", keys[s::2])
        make_neighbour_shard(root, f"{s:05d}", keys[s::2], keys)
    pack_corpus(root)
    cfg = load_config("paper", overrides=[
        "train.n_layer=1", "train.d_model=32", "train.n_head=2", "train.batch_size=1",
        "train.max_steps=2", "train.warmup_steps=1", 'train.strategy="auto"',
        'train.accelerator="cpu"', "train.num_workers=0", "train.threads=1",
        "train.progress_bar=false", "train.ce_chunk=1024", "train.activation_checkpointing=true",
        'train.precision="32-true"'])["train"]
    assert (cfg.seq_len, cfg.k_max, cfg.model) == (4096, 2, "paper")  # the preset's shapes
    stage = TrainStage()
    execute_shard(stage, root, cfg, stage.plan(root, cfg)[0])
    m = read_manifest(root, "train", "ra-cm3")
    assert m.metrics["steps"] == 2 and m.metrics["seq_len"] == 4096
    assert m.metrics["retrieved_docs"] > 0  # K > 0 units of ~1,050-token documents fit
    assert np.isfinite(m.metrics["loss"]) and m.metrics["loss"] > 1
    model, vocab, rec = load_trained(root, "ra-cm3")
    assert vocab.n_text == N_TEXT and vocab.n_image == N_IMAGE
    assert model.cfg.max_seq_len == 4096 and model.cfg.vocab_size == vocab.size > 57_000
    assert (model.cfg.n_layer, model.cfg.d_model) == (1, 32)
