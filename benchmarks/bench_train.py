"""Benchmark: Lightning training loop vs a plain PyTorch loop (same model, batches, optimizer),
the block-diagonal mask's cost (plain loop with vs without it), and the data loader's
sequences/s vs what a training step consumes.

    python benchmarks/bench_train.py [--steps 20] [--batch-size 16] [--model demo] [--device cpu]

Prints tokens/s of each loop (alternating runs, median): Lightning / plain (both with the block
mask, as training runs; goal >= 0.9x), masked / unmasked plain (the mask's cost), peak memory,
and sequences/s assembled (retrieval prepending + masking + packing) vs consumed.
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import time
from itertools import islice

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run as a script

from model.document import Vocab
from model.transformer import Transformer, preset
from pipelines.training.sequences import (
    AssemblyConfig,
    Corpus,
    SequenceStream,
    collate,
    longest_unit,
)
from pipelines.training.train import CM3Module, TrainConfig, lr_lambda, sequence_losses


def synthetic_corpus(n_docs: int = 2000, caption: int = 8, image: int = 64, seed: int = 0) -> Corpus:
    """Demo-shaped documents (8 caption tokens, 8x8 image codes) with 2 neighbours per query."""
    rng = np.random.default_rng(seed)
    vocab = Vocab(n_text=512, n_image=64)
    keys = [f"{i:06d}" for i in range(n_docs)]
    docs = {k: np.asarray(vocab.encode(rng.integers(0, 512, caption), rng.integers(0, 64, image)),
                          dtype=np.int32) for k in keys}
    neighbours = {k: {(q, v): [keys[j] for j in rng.integers(0, n_docs, 2)]
                      for q in ("text", "image") for v in range(3)} for k in keys}
    return Corpus(vocab=vocab, docs=docs, neighbours=neighbours)


def make_batches(corpus: Corpus, cfg: AssemblyConfig, n: int, batch_size: int) -> list[dict]:
    stream = iter(SequenceStream(corpus, cfg, seed=0))
    return [collate(list(islice(stream, batch_size))) for _ in range(n)]


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: str):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def plain_loop(model_cfg, train_cfg: dict, batches: list[dict], device: str,
               block_mask: bool = True) -> float:
    """Seconds for the optimizer steps of a hand-written loop (after one warm-up step)."""
    torch.manual_seed(0)
    model = Transformer(model_cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=train_cfg["lr"], betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train_cfg["warmup_steps"],
                                                             train_cfg["max_steps"]))
    t0 = 0.0
    for i, batch in enumerate(batches):
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        with autocast(device):
            loss = sequence_losses(model, to_device(batch, device), block_mask)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    sync(device)
    return time.perf_counter() - t0


class StepTimer(L.Callback):
    """Times Lightning from the start of its second step to the end of the last one."""

    def __init__(self):
        self.t0 = self.t1 = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:
            sync(module.device.type)
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, module):
        sync(module.device.type)
        self.t1 = time.perf_counter()


def lightning_loop(model_cfg, train_cfg: dict, batches: list[dict], device: str) -> float:
    torch.manual_seed(0)
    module = CM3Module(model_cfg, TrainConfig(lr=train_cfg["lr"], beta1=train_cfg["beta1"],
                                              beta2=train_cfg["beta2"], warmup_steps=train_cfg["warmup_steps"],
                                              max_steps=train_cfg["max_steps"], block_mask=train_cfg["block_mask"]))
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=len(batches), accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if device == "cuda" else "32-true", gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], limit_val_batches=0,
        num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return timer.t1 - timer.t0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def loader_rate(corpus: Corpus, cfg: AssemblyConfig, n: int, batch_size: int) -> float:
    """Sequences/s assembled and collated by the training data path."""
    stream = iter(SequenceStream(corpus, cfg, seed=1))
    t0 = time.perf_counter()
    for _ in range(n):
        collate(list(islice(stream, batch_size)))
    return n * batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default="demo")
    p.add_argument("--seq-len", type=int, default=0, help="0 = 3 longest documents")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = synthetic_corpus()
    seq_len = args.seq_len or longest_unit(corpus, AssemblyConfig())
    asm = AssemblyConfig(seq_len=seq_len)
    model_cfg = preset(args.model, corpus.vocab.size, max_seq_len=max(seq_len, 1024))
    train_cfg = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.98, "warmup_steps": 5,
                 "max_steps": args.steps + 1, "block_mask": True}
    batches = make_batches(corpus, asm, args.steps + 1, args.batch_size)
    tokens = args.steps * args.batch_size * seq_len
    print(f"model {args.model} ({Transformer(model_cfg).num_params() / 1e6:.2f}M params), "
          f"device {args.device}, threads {torch.get_num_threads()}, seq_len {seq_len}, "
          f"batch {args.batch_size}, {args.steps} timed steps x {args.repeats} alternating runs")
    plain, light, unmasked = [], [], []
    for _ in range(args.repeats):
        plain.append(tokens / plain_loop(model_cfg, train_cfg, batches, args.device))
        light.append(tokens / lightning_loop(model_cfg, train_cfg, batches, args.device))
        unmasked.append(tokens / plain_loop(model_cfg, train_cfg, batches, args.device, False))
    p_med, l_med, u_med = (statistics.median(x) for x in (plain, light, unmasked))

    def runs(xs: list[float]) -> str:
        return ", ".join(f"{x:.0f}" for x in xs)

    print(f"plain loop, block mask   : {p_med:10.0f} tokens/s  (runs: {runs(plain)})")
    print(f"Lightning, block mask    : {l_med:10.0f} tokens/s  (runs: {runs(light)})")
    print(f"plain loop, no mask (old): {u_med:10.0f} tokens/s  (runs: {runs(unmasked)})")
    print(f"ratio Lightning / plain: {l_med / p_med:.3f}x  (goal >= 0.9x)")
    print(f"ratio block mask / no mask (plain loop): {p_med / u_med:.3f}x  (the mask's cost)")
    print(f"peak memory: {peak_memory_mb(args.device):.0f} MiB "
          f"({'CUDA allocated' if args.device == 'cuda' else 'process RSS'})")
    rate = loader_rate(corpus, asm, max(5, args.steps), args.batch_size)
    consume = l_med / seq_len
    print(f"data loader: {rate:.0f} sequences/s assembled vs {consume:.1f} sequences/s consumed "
          f"by training ({rate / consume:.1f}x headroom, one process)")


if __name__ == "__main__":
    main()
