"""Benchmark fit-vqgan: training steps/s of the demo VQGAN against the previous set-up, side by side.

Usage: python benchmarks/bench_fit_vqgan.py [--steps 40] [--repeats 2]
Rows: the previous default (one res block per level, 2 torch threads), the same on 1 thread, the
current default (no level res blocks, 1 thread) as a plain PyTorch loop and on 2 threads (faster on
idle cores, several times slower when other processes hold them), and the current default
through the stage's Lightning `fit` (its overhead). Repeats are interleaved, best kept, since other
processes share the cores; ratios are against the first row.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.vqgan import VQGAN  # noqa: E402
from pipelines.demo.fit_vqgan import FitVQGANConfig, VQGANModule, fit, patch_centres  # noqa: E402


def plain_steps(cfg: FitVQGANConfig, images: np.ndarray, centres: torch.Tensor, steps: int) -> float:
    """Steps/s of the stage's training step and optimizer in a bare loop (no Lightning)."""
    from pipelines.demo.fit_vqgan import assign

    module = VQGANModule(VQGAN(cfg.vqgan()), cfg)
    opt = torch.optim.Adam(module.model.parameters(), lr=cfg.lr)
    x, targets = torch.from_numpy(images), assign(images, centres, cfg.factor)
    t0 = time.perf_counter()
    for _ in range(steps):
        pick = torch.randint(0, len(x), (cfg.batch_size,))
        loss = module.training_step([x[pick], targets[pick]], 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def lightning_steps(cfg: FitVQGANConfig, images: np.ndarray, centres: torch.Tensor, steps: int) -> float:
    t0 = time.perf_counter()
    fit(VQGAN(cfg.vqgan()), images, dataclasses.replace(cfg, max_steps=steps), centres)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    new = FitVQGANConfig()
    old = dataclasses.replace(new, res_blocks=1)
    images = np.random.default_rng(0).integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    centres = patch_centres(images, new)
    rows = {"previous: res_blocks=1, 2 threads": (old, 2, plain_steps),
            "res_blocks=1, 1 thread": (old, 1, plain_steps),
            "current: res_blocks=0, 1 thread": (new, 1, plain_steps),
            "res_blocks=0, 2 threads": (new, 2, plain_steps),
            "current, through Lightning fit()": (new, 1, lightning_steps)}
    best = dict.fromkeys(rows, 0.0)
    for _ in range(args.repeats):
        for name, (cfg, threads, run) in rows.items():
            torch.set_num_threads(threads)
            best[name] = max(best[name], run(cfg, images, centres, args.steps))
    base = best[next(iter(rows))]
    for name, rate in best.items():
        print(f"{name:36s} {rate:6.1f} steps/s  {rate / base:5.2f}x")


if __name__ == "__main__":
    main()
