"""Multi-process training: train.strategy=ddp with 2 CPU processes (gloo) against one process
training on the same global batch (both readers' batches, gradients averaged as DDP does).

Tolerance: per-step losses within 1e-4 absolute (DDP sums gradients in another order than one
process; over a few Adam steps the difference stays at float32 rounding level)."""

import dataclasses
import json
import os
import subprocess
import sys
from itertools import islice

import lightning as L
import pytest
import torch

from model.transformer import preset
from pipelines.training.objective import lr_lambda, sequence_losses
from pipelines.training.sequences import SequenceStream, collate, reader_order
from pipelines.training.token_store import open_store
from pipelines.training.train import CM3Module, TrainConfig
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.training.corpus_factory import make_corpus
from tests.pipelines.training.train_child import read_records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
STEPS = 6


def test_readers_partition_every_epoch():
    for n, readers in ((10, 2), (70_000, 3)):  # one block, and several blocks of the order
        seen = [sorted(i for _, i in reader_order(n, 5, 2, r, readers)) for r in range(readers)]
        flat = [i for s in seen for i in s]
        assert sorted(flat) == list(range(n)) and len(set(flat)) == n  # disjoint and complete
    resumed = list(reader_order(70_000, 5, 2, 1, 3, start=40_000))
    assert resumed == [(g, i) for g, i in reader_order(70_000, 5, 2, 1, 3) if g >= 40_000]


def reference_losses(root: DataRoot, cfg: TrainConfig,
                     world: int) -> tuple[list[list[float]], list[list[list]]]:
    """One process, global batch = the `world` readers' batches: (loss, main-document keys)
    per reader per step."""
    store = open_store(root, cfg.uses_neighbours)
    seq_len = cfg.resolve_seq_len(store)
    torch.set_num_threads(1)
    L.seed_everything(cfg.seed, verbose=False)
    mcfg = preset(cfg.model, store.vocab.size, max_seq_len=max(seq_len, 1024))
    module = CM3Module(mcfg, cfg)
    opt = torch.optim.Adam(module.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.max_steps))
    stream = SequenceStream(store, cfg.assembly(seq_len), seed=cfg.seed)
    readers = [stream.sequences(r, world) for r in range(world)]
    out, keys = [], []
    for _ in range(cfg.max_steps):
        batches = [collate(list(islice(rd, cfg.batch_size))) for rd in readers]
        losses = [sequence_losses(module.model, b, cfg.block_mask)["loss"] for b in batches]
        opt.zero_grad()
        (sum(losses) / world).backward()  # DDP: mean of the ranks' gradients
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        out.append([float(x) for x in losses])
        keys.append([b["keys"] for b in batches])
    return out, keys


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    make_corpus(root, n=24, shards=2, packed=True)
    cfg = TrainConfig(batch_size=2, seq_len=72, max_steps=STEPS, warmup_steps=2, lr=3e-3,
                      progress_bar=False, log_every=1, threads=1, accelerator="cpu",
                      devices="2", strategy="ddp", checkpoint_every=3)
    rec = str(tmp_path / "ddp.jsonl")
    params = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    done = subprocess.run([sys.executable, "-m", "tests.pipelines.training.train_child",
                           root.path, json.dumps(params), rec], cwd=REPO, capture_output=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    m = read_manifest(root, "train", "ra-cm3")
    assert m is not None and m.metrics["steps"] == STEPS  # rank 0 committed, rank 1 did not fail
    tokens = m.metrics["tokens_per_s"] * m.metrics["train_seconds"]  # both ranks' sequences
    assert abs(tokens / (STEPS * cfg.batch_size * 2 * m.metrics["seq_len"]) - 1) < 0.05, tokens
    ranks = [read_records(f"{rec}.rank{r}") for r in range(2)]
    assert all(sorted(r) == list(range(STEPS)) for r in ranks)
    first = [set(k for seq in ranks[r][0]["keys"] for k in seq) for r in range(2)]
    assert first[0] and first[1] and not first[0] & first[1]  # disjoint data per rank

    ref, ref_keys = reference_losses(root, cfg, world=2)
    diffs = []
    for step in range(STEPS):
        for r in range(2):
            assert ranks[r][step]["keys"] == ref_keys[step][r], (step, r)
            diffs.append(abs(ranks[r][step]["loss"] - ref[step][r]))
    assert max(diffs) < 1e-4, diffs
    assert ref[-1][0] < ref[0][0]  # it trained
    # the checkpoint holds the stream state of both ranks' readers (gathered on save)
    workdir = root.join(m.metrics["checkpoints"], "checkpoints", "last.ckpt")
    ckpt = torch.load(workdir, weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if "StreamCheckpoint" in k)
    assert sorted(state["readers"]) == ["0", "1"] and state["batches"] == 6
