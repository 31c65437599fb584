"""Benchmark: Lightning training loop vs a plain PyTorch loop (same model, batches, optimizer),
the block-diagonal mask's cost (plain loop with vs without it), and the data loader's
sequences/s vs what a training step consumes.

    python benchmarks/bench_train.py [--steps 20] [--batch-size 16] [--model demo] [--device cpu]
        [--data-root DIR] [--threads N] [--fused] [--compile]

Prints tokens/s of each loop (alternating runs, median): Lightning / plain (both with the block
mask, as training runs; goal >= 0.9x), bf16 autocast / fp32 (goal >= 1.5x) with MFU against the
fp32 and bf16 matmul peaks measured in the same process, loss curves of bf16 vs fp32 beside the
seed noise (fp32 seed 1 vs seed 0), torch.compile with --compile, fused Adam with --fused,
masked / unmasked plain (the mask's cost), peak memory, and sequences/s assembled vs consumed.
Beside wall-clock tokens/s it prints tokens per CPU-second (process time), which other processes
on a shared machine barely change: on a loaded machine compare those. --data-root trains on a
packed store (the demo's `pack/`) instead of synthetic demo-shaped documents.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import time
from itertools import islice
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run as a script

from benchmarks.dict_source import DictSource as Corpus
from model.document import Vocab
from model.transformer import Transformer, preset
from pipelines.training.objective import lr_lambda, sequence_losses
from pipelines.training.sequences import (
    AssemblyConfig,
    SequenceStream,
    collate,
    longest_unit,
)
from pipelines.training.token_store import open_store
from pipelines.training.train import CM3Module, TrainConfig
from storage.fs import DataRoot


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


def autocast(device: str, bf16: bool | None = None):
    """bf16 autocast on CUDA by default; on CPU only when asked (AVX-512 bf16 / AMX)."""
    if bf16 is None:
        bf16 = device == "cuda"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)


def plain_loop(model_cfg, train_cfg: dict, batches: list[dict], device: str,
               block_mask: bool = True, bf16: bool | None = None, compile: bool = False,
               losses: list[float] | None = None, seed: int = 0,
               fused: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds for the optimizer steps of a hand-written loop (after one warm-up
    step); appends each step's loss to `losses`."""
    torch.manual_seed(seed)
    model = Transformer(model_cfg).to(device)
    fwd = torch.compile(sequence_losses) if compile else sequence_losses
    opt = torch.optim.Adam(model.parameters(), lr=train_cfg["lr"], betas=(0.9, 0.98),
                           **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train_cfg["warmup_steps"],
                                                             train_cfg["max_steps"]))
    t0 = c0 = 0.0
    for i, batch in enumerate(batches):
        if i == 1:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
        with autocast(device, bf16):
            loss = fwd(model, to_device(batch, device), block_mask)["loss"]
        if losses is not None:
            losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


class StepTimer(L.Callback):
    """Times Lightning from the start of its second step to the end of the last one."""

    def __init__(self):
        self.t0 = self.t1 = self.c0 = self.c1 = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:
            sync(module.device.type)
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, module):
        sync(module.device.type)
        self.t1, self.c1 = time.perf_counter(), time.process_time()


def lightning_loop(model_cfg, train_cfg: dict, batches: list[dict], device: str,
                   precision: str = "") -> tuple[float, float]:
    torch.manual_seed(0)
    module = CM3Module(model_cfg, TrainConfig(lr=train_cfg["lr"], beta1=train_cfg["beta1"],
                                              beta2=train_cfg["beta2"], warmup_steps=train_cfg["warmup_steps"],
                                              max_steps=train_cfg["max_steps"], block_mask=train_cfg["block_mask"]))
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=len(batches), accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        precision=precision or ("bf16-mixed" if device == "cuda" else "32-true"),
        gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], limit_val_batches=0,
        num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return timer.t1 - timer.t0, timer.c1 - timer.c0


def flops_per_token(model_cfg, seq_len: int, params: int) -> float:
    """Training FLOPs per token: 6 per parameter plus attention scores (PaLM appendix B)."""
    return 6 * params + 12 * model_cfg.n_layer * seq_len * model_cfg.d_model


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n matmuls at this process's thread setting; on a CPU
    shared with other processes, per CPU-second of one thread (threads x FLOP per CPU-second)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    best = cpu_best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
        cpu_best = min(cpu_best, (time.process_time() - c0) / torch.get_num_threads())
    return 2 * n**3 / (best if device == "cuda" else min(best, max(cpu_best, 1e-9)))


def curve_diff(a: list[float], b: list[float]) -> float:
    return statistics.fmean(abs(x - y) for x, y in zip(a, b, strict=True))


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


def store_source(data_root: str, seq_len: int) -> tuple[Any, AssemblyConfig]:
    """The packed token store under `data_root` (neighbours included) and the demo's assembly."""
    cfg = TrainConfig(seq_len=seq_len)
    corpus = open_store(DataRoot(data_root), cfg.uses_neighbours)
    return corpus, cfg.assembly(cfg.resolve_seq_len(corpus))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default="demo")
    p.add_argument("--seq-len", type=int, default=0, help="0 = 3 longest documents")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data-root", default="", help="train on this root's packed store (pack/)")
    p.add_argument("--fused", action="store_true", help="also fused Adam (fp32 and bf16)")
    p.add_argument("--no-lightning", action="store_true", help="plain loops only (faster)")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile runs (compiling takes minutes on 2 loaded cores)")
    return p.parse_args()


def variants(args: argparse.Namespace) -> list[str]:
    names = ["plain fp32", "plain bf16"]
    if not args.no_lightning:
        names += ["Lightning 32-true", "Lightning bf16-mixed"]
    names += ["plain fp32 no mask"]
    if args.fused:
        names += ["plain fp32 fused-adam", "plain bf16 fused-adam"]
    if args.compile:
        names += ["plain fp32 compile", "plain bf16 compile"]
    return names


def main() -> None:
    args = parse_args()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_root:
        corpus, asm = store_source(args.data_root, args.seq_len)
    else:
        corpus = synthetic_corpus()
        asm = AssemblyConfig(seq_len=args.seq_len or longest_unit(corpus, AssemblyConfig()))
    seq_len = asm.seq_len
    model_cfg = preset(args.model, corpus.vocab.size, max_seq_len=max(seq_len, 1024))
    train_cfg = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.98, "warmup_steps": 5,
                 "max_steps": args.steps + 1, "block_mask": True}
    batches = make_batches(corpus, asm, args.steps + 1, args.batch_size)
    tokens = args.steps * args.batch_size * seq_len
    print(f"model {args.model} ({Transformer(model_cfg).num_params() / 1e6:.2f}M params), "
          f"device {args.device}, threads {torch.get_num_threads()}, seq_len {seq_len}, "
          f"batch {args.batch_size}, {args.steps} timed steps x {args.repeats} alternating runs, "
          f"data {args.data_root or 'synthetic'}, load {os.getloadavg()[0]:.1f}")
    flops = flops_per_token(model_cfg, seq_len, Transformer(model_cfg).num_params())
    peak32, peak16 = matmul_peak(torch.float32, args.device), matmul_peak(torch.bfloat16, args.device)
    print(f"matmul peak (2048^2, this process): fp32 {peak32 / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak16 / 1e9:.0f} GFLOP/s; model {flops / 1e6:.2f} MFLOP/token (6N + 12LTd)")
    names = variants(args)
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu_rates: dict[str, list[float]] = {n: [] for n in names}
    curves: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for name in names:
            losses: list[float] = []
            if name.startswith("Lightning"):
                secs, cpu = lightning_loop(model_cfg, train_cfg, batches, args.device,
                                           name.split()[1])
            else:
                secs, cpu = plain_loop(model_cfg, train_cfg, batches, args.device,
                                       "no mask" not in name, "bf16" in name, "compile" in name,
                                       losses, fused="fused" in name)
            rates[name].append(tokens / secs)
            cpu_rates[name].append(tokens / cpu)
            print(f"  run {r}: {name:<22} {tokens / secs:10.0f} tokens/s  {tokens / cpu:10.0f} "
                  f"tokens/CPU-s  load {os.getloadavg()[0]:.1f}", flush=True)
            if r == 0 and losses:
                curves[name] = losses
    seed1: list[float] = []
    plain_loop(model_cfg, train_cfg, batches, args.device, losses=seed1, seed=1)
    report(names, rates, cpu_rates, peak32, peak16, flops)
    ref = curves["plain fp32"]
    for name, c in curves.items():
        if name != "plain fp32":
            print(f"loss curve {name} vs plain fp32: mean |diff| {curve_diff(c, ref):.4f} "
                  f"(seed noise, fp32 seed 1 vs 0: {curve_diff(seed1, ref):.4f}; last loss "
                  f"{c[-1]:.3f} vs {ref[-1]:.3f})")
    print(f"peak memory: {peak_memory_mb(args.device):.0f} MiB "
          f"({'CUDA allocated' if args.device == 'cuda' else 'process RSS'})")
    rate = loader_rate(corpus, asm, max(5, args.steps), args.batch_size)
    consume = statistics.median(rates[names[2] if not args.no_lightning else names[0]]) / seq_len
    print(f"data loader: {rate:.0f} sequences/s assembled vs {consume:.1f} sequences/s consumed "
          f"by training ({rate / consume:.1f}x headroom, one process); load {os.getloadavg()[0]:.1f}")


def report(names: list[str], rates: dict[str, list[float]], cpu_rates: dict[str, list[float]],
           peak32: float, peak16: float, flops: float) -> None:
    """Medians, MFU, and each ratio in wall-clock and in CPU time."""
    threads = torch.get_num_threads()
    med = {n: statistics.median(x) for n, x in rates.items()}
    cmed = {n: statistics.median(x) for n, x in cpu_rates.items()}
    for name in names:
        print(f"{name:<22}: {med[name]:10.0f} tokens/s  {med[name] / med['plain fp32']:.2f}x fp32 "
              f"({cmed[name] / cmed['plain fp32']:.2f}x in CPU time)  MFU "
              f"{med[name] * flops / peak32:.1%} of fp32 peak, {med[name] * flops / peak16:.1%} "
              f"of bf16 peak, in CPU time {cmed[name] * threads * flops / peak32:.1%} / "
              f"{cmed[name] * threads * flops / peak16:.1%}  "
              f"(runs: {', '.join(f'{x:.0f}' for x in rates[name])})")
    p_med, p_cpu = med["plain fp32"], cmed["plain fp32"]
    print(f"ratio bf16 / fp32 (plain loop): {med['plain bf16'] / p_med:.2f}x wall, "
          f"{cmed['plain bf16'] / p_cpu:.2f}x CPU time  (goal >= 1.5x)")
    if "Lightning 32-true" in med:
        l_med, l_cpu = med["Lightning 32-true"], cmed["Lightning 32-true"]
        print(f"ratio Lightning / plain: {l_med / p_med:.3f}x  (goal >= 0.9x)")
        print(f"ratio Lightning bf16-mixed / 32-true: {med['Lightning bf16-mixed'] / l_med:.2f}x "
              f"wall, {cmed['Lightning bf16-mixed'] / l_cpu:.2f}x CPU time  (goal >= 1.5x)")
    print(f"ratio block mask / no mask (plain loop): {p_med / med['plain fp32 no mask']:.3f}x  "
          f"(the mask's cost)")


if __name__ == "__main__":
    main()
