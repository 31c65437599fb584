"""Training settings side by side through the real train stage (Lightning, the packed store):
tokens/s and the loss curve of each against the default (one process, torch's threads, fp32).

    python benchmarks/bench_train_settings.py [--data-root ROOT | --docs 4000] [--steps 60]
        [--batch-size 32] [--settings default,bf16,ddp2x1,ddp2x1-bf16]

ROOT is a demo data root after `pack` (the demo's own, e.g. `data/`); it is copied to a scratch
folder, never written. Without it, demo-shaped token and neighbour shards are generated and packed
(random tokens: the speed is the demo's, the loss curve is not). Every setting trains `--steps` optimizer steps of the same global batch
(`--batch-size` sequences: under DDP each of the 2 ranks takes half) in its own child process
(`execute_shard` of the train stage, as `racm3 run train` does), with a callback that records each
step's loss (under DDP the mean of the ranks' losses, i.e. the global batch's). Printed per
setting: tokens/s of the whole run (the stage's `tokens_per_s`: all ranks' tokens over
`trainer.fit`, DDP's process launch included) and in the steady state (after 10 steps), the ratio to the default, and the mean |loss difference| to the default's curve beside
the seed noise (the default with seed + 1). Settings:

- `default`: one process, `train.threads` 0 (torch's default: one per core), precision 32-true;
- `bf16`: the same with `train.precision = bf16-mixed`;
- `ddp2x1`: `train.strategy = ddp`, 2 CPU processes (gloo) of 1 thread each, batch halved per rank;
- `ddp2x1-bf16`: both;
- `jemalloc`, `tcmalloc`: the default with that allocator in LD_PRELOAD (skipped if not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
WARM_STEPS = 10  # steps left out of the steady-state rate

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "bf16": {"precision": "bf16-mixed"},
    "ddp2x1": {"strategy": "ddp", "devices": "2", "accelerator": "cpu", "threads": 1},
    "ddp2x1-bf16": {"strategy": "ddp", "devices": "2", "accelerator": "cpu", "threads": 1,
                    "precision": "bf16-mixed"},
    # the default with another malloc preloaded (Debian: libjemalloc2, libtcmalloc-minimal4)
    "jemalloc": {"_preload": "jemalloc"},
    "tcmalloc": {"_preload": "tcmalloc_minimal"},
}


def child(root_uri: str, params: dict[str, Any], record: str) -> None:
    """Train with the demo's [train] and `params` on the root; one JSON line per step and rank."""
    import dataclasses

    import lightning as L

    from pipelines.core.registry import load_config
    from pipelines.core.stage import execute_shard
    from pipelines.training.train import TrainStage
    from storage.fs import DataRoot

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            with open(f"{record}.rank{trainer.global_rank}", "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(loss),
                                    "t": time.time()}) + "\n")

    # the demo preset's [train] (model, lr, schedule, sequence length) with this setting's fields
    root, cfg = DataRoot(root_uri), dataclasses.replace(load_config("demo")["train"], **params)
    stage = TrainStage([Losses()])
    execute_shard(stage, root, cfg, stage.plan(root, cfg)[0])


def curve(record: str) -> tuple[list[float], list[float]]:
    """Per step, the mean over ranks of the recorded losses (the global batch's loss), and the
    time rank 0 finished it."""
    by_step: dict[int, list[float]] = {}
    times: dict[int, float] = {}
    for path in sorted(Path(record).parent.glob(Path(record).name + ".rank*")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], []).append(rec["loss"])
            if path.name.endswith(".rank0"):
                times[rec["step"]] = rec["t"]
    steps = sorted(by_step)
    return [statistics.mean(by_step[s]) for s in steps], [times[s] for s in steps]


def run(root: str, name: str, setting: dict[str, Any], args: argparse.Namespace, work: Path,
        seed: int = 0) -> dict[str, Any]:
    """One training run in a child; its manifest's throughput and its loss curve."""
    from storage.fs import DataRoot
    from storage.manifest import read_manifest

    world = int(setting.get("devices", "1"))
    params = {"variant": "ra-cm3", "name": f"bench-{name}-s{seed}", "seed": seed,
              "max_steps": args.steps, "warmup_steps": max(1, args.steps // 10),
              "batch_size": args.batch_size // world, "progress_bar": False,
              "checkpoint_every": 10 ** 6,
              **{k: v for k, v in setting.items() if not k.startswith("_")}}
    record = str(work / f"{params['name']}.jsonl")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    if "_preload" in setting:
        env["LD_PRELOAD"] = preload(setting["_preload"])
    if world > 1:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", root,
                           json.dumps(params), record], cwd=HERE.parent, env=env,
                          capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    m = read_manifest(DataRoot(root), "train", params["name"])
    assert m is not None
    losses, times = curve(record)
    skip = min(WARM_STEPS, len(times) // 2)  # steady state: after start-up and warm-up steps
    steady = ((len(times) - 1 - skip) * args.batch_size * m.metrics["seq_len"]
              / max(times[-1] - times[skip], 1e-9))
    return {"tokens_per_s": m.metrics["tokens_per_s"], "train_s": m.metrics["train_seconds"],
            "steady": steady, "wall": wall, "curve": losses,
            "precision": m.metrics.get("precision"), "load": os.getloadavg()[0]}


def generated_root(root: str, docs: int) -> None:
    """Demo-shaped token and neighbour shards (benchmarks/scale_training.py), packed."""
    from benchmarks.scale_training import generate
    from pipelines.core.runconfig import RunConfig
    from pipelines.core.runner import run_stage
    from pipelines.training.pack import PackConfig
    from storage.fs import DataRoot

    generate(root, docs)
    assert run_stage("pack", DataRoot(root), {"pack": PackConfig(), "run": RunConfig()}).ok


def preload(lib: str) -> str:
    """The shared library's path for LD_PRELOAD, or '' when it is not installed."""
    import ctypes.util

    return ctypes.util.find_library(lib) or ""


def diff(a: list[float], b: list[float]) -> float:
    n = min(len(a), len(b))
    return statistics.mean(abs(x - y) for x, y in zip(a[:n], b[:n], strict=True))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-root", default="",
                    help="a demo data root after pack (default: generated demo-shaped shards)")
    ap.add_argument("--docs", type=int, default=4000, help="generated documents (no --data-root)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args()
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    with tempfile.TemporaryDirectory(prefix="racm3-train-settings-") as tmp:
        root, work = os.path.join(tmp, "root"), Path(tmp)
        if args.data_root:
            src = Path(args.data_root)
            shutil.copytree(src, root, ignore=shutil.ignore_patterns("train", "evaluate*", "ablate*"))
        else:
            src = Path(f"generated ({args.docs:,} documents)")
            generated_root(root, args.docs)
        print(f"[train settings] {args.steps} steps, global batch {args.batch_size}, data "
              f"{src}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
        res = {}
        for name in ["default", *[n for n in names if n != "default"]]:
            if "_preload" in SETTINGS[name] and not preload(SETTINGS[name]["_preload"]):
                print(f"  {name:<12} skipped: lib{SETTINGS[name]['_preload']} is not installed")
                continue
            res[name] = run(root, name, SETTINGS[name], args, work)
            r = res[name]
            print(f"  {name:<12} {r['tokens_per_s']:8.0f} tokens/s whole run, {r['steady']:8.0f} "
                  f"steady  train {r['train_s']:6.1f} s  "
                  f"(child wall {r['wall']:.1f} s, {r['precision']}; load {r['load']:.2f})",
                  flush=True)
        noise = diff(run(root, "default", {}, args, work, seed=1)["curve"], res["default"]["curve"])
        base = res["default"]
        print(f"ratios vs default (one process, torch threads, fp32); seed noise of the loss "
              f"curve (default seed 1 vs 0): {noise:.4f}")
        for name, r in res.items():
            if name != "default":
                print(f"  {name:<12} {r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s "
                      f"whole run, {r['steady'] / base['steady']:.2f}x steady "
                      f"(goal >= 1.5x); loss curve mean |diff| {diff(r['curve'], base['curve']):.4f}"
                      f" (seed noise {noise:.4f}); last loss {r['curve'][-1]:.3f} vs "
                      f"{base['curve'][-1]:.3f}")


if __name__ == "__main__":
    main()
