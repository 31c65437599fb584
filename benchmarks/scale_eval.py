"""Scaling benchmark of the streamed, sharded evaluation: `evaluate-part` + `evaluate` at 1x, 4x,
16x evaluation images, seconds per 1,000 images and peak RSS, each stage a child process
(`racm3 run STAGE --local`, peak RSS from os.wait4).

    python benchmarks/scale_eval.py [--sizes 1,4,16] [--base 8] [--keep DIR]

The trained set-up is the evaluate tests' tiny one (fit-vqgan, tokenize, embed, index, retrieve,
pack, both variants trained a few steps); the COCO splits are new renderings of its entities.
Images are read and encoded in batches (`evaluate.batch_images`), shards hold
`evaluate.shard_images` images, so a process's memory should not grow with the split.
benchmarks/bench_scale.py imports `rows(sizes)` when this file exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

BASE_IMAGES = 16  # two shards at 1x, so shard concurrency is the same at every size
EVAL = ["evaluate.max_images=0", "evaluate.shard_images=8", "evaluate.batch_images=4",
        "evaluate.image_samples=1", "evaluate.caption_samples=2", "evaluate.max_caption_tokens=4",
        "evaluate.bootstrap=100", "evaluate.show=2", "evaluate.threads=1",
        "evaluate.dup_image_threshold=0.9999", "evaluate.dup_text_threshold=0.9999"]  # random CLIP: 0.98 would exclude the whole memory


def build_root(work: Path) -> Any:
    """The tiny trained data root (what tests/pipelines/evaluation/test_evaluate.py trains)."""
    import torch

    from benchmarks.download_shards import make_download_shard
    from pipelines.core.runner import run_stage
    from pipelines.training.train import TrainConfig
    from storage.fs import DataRoot
    from tests.pipelines.evaluation.test_evaluate import FIT, TOK, TRAIN
    from tests.pipelines.retrieval.retrieval_helpers import configs, write_checkpoint

    torch.set_num_threads(1)
    root = DataRoot(str(work / "data"))
    write_checkpoint(root)
    make_download_shard(root, "00000", n=8, size=64)
    make_download_shard(root, "00001", n=8, start=8, size=64)
    cfgs = configs(fit_vqgan=FIT, tokenize=TOK)
    for stage in ("fit-vqgan", "tokenize", "embed", "index", "retrieve", "pack"):
        if not run_stage(stage, root, cfgs).ok:
            raise RuntimeError(f"set-up stage {stage} failed")
    for variant in ("ra-cm3", "vanilla"):
        cfgs["train"] = TrainConfig(variant=variant, **TRAIN)
        if not run_stage("train", root, cfgs).ok:
            raise RuntimeError(f"training {variant} failed")
    return root


def write_split(root: Any, name: str, n: int) -> str:
    """n new renderings of the memory's 16 entities, 5 captions each; returns the JSON's path."""
    from tests.factories import NAMES, entity_image

    folder = root.join(name)
    root.makedirs(folder + "/images")
    images, anns = [], []
    for i in range(n):
        entity_image(i % 16, 64, seed=1000 + i).save(f"{folder}/images/{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns += [{"id": 10 * i + j, "image_id": i, "caption": f"the {NAMES[i % 8]} view {j}"}
                 for j in range(5)]
    with open(f"{folder}/captions.json", "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return f"{name}/captions.json"


def run_child(stage: str, root: Any, overrides: list[str], log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `racm3 run STAGE --local` in a child process."""
    args = [sys.executable, "-m", "flows.cli", "run", stage, "--local", "--data-root", root.uri]
    for o in overrides:
        args += ["--set", o]
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=str(HERE.parent))
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{stage} failed; see {log}")
    return dt, usage.ru_maxrss * 1024  # Linux reports KiB


def rows(sizes: list[int], base: int = BASE_IMAGES, keep: str | None = None) -> list[dict[str, Any]]:
    """One row per size: stage="evaluate", size, docs (evaluation images), seconds_per_1k, and
    peak_rss_mb (the larger of the part and reduce children), plus each child's own figures."""
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="racm3-scale-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        root = build_root(work)
        out = []
        for s in sizes:
            n = base * s
            coco = write_split(root, f"coco_x{s}", n)
            over = [*EVAL, f'evaluate.coco="{coco}"']
            t_part, rss_part = run_child("evaluate-part", root, over, work / "log.txt")
            t_red, rss_red = run_child("evaluate", root, over, work / "log.txt")
            out.append({"stage": "evaluate", "size": s, "docs": n,
                        "seconds_per_1k": round(1000 * (t_part + t_red) / n, 1),
                        "peak_rss_mb": round(max(rss_part, rss_red) / 2**20, 1),
                        "part_rss_mb": round(rss_part / 2**20, 1),
                        "reduce_rss_mb": round(rss_red / 2**20, 1),
                        "part_seconds": round(t_part, 1), "reduce_seconds": round(t_red, 1)})
        return out
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--base", type=int, default=BASE_IMAGES, help="evaluation images at 1x")
    ap.add_argument("--keep", default=None, help="keep the work folder here")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    table = rows(sizes, a.base, a.keep)
    print(f"{'size':>5} {'images':>7} {'s/1k img':>9} {'peak MiB':>9} {'part MiB':>9} {'reduce MiB':>10}")
    for r in table:
        print(f"{'x' + str(r['size']):>5} {r['docs']:>7} {r['seconds_per_1k']:>9} {r['peak_rss_mb']:>9} "
              f"{r['part_rss_mb']:>9} {r['reduce_rss_mb']:>10}")
    a0, b0 = table[0], table[-1]
    print(f"peak RSS x{b0['size']} / x{a0['size']}: {b0['peak_rss_mb'] / a0['peak_rss_mb']:.2f} "
          f"(goal <= 1.25); s/image ratio {b0['seconds_per_1k'] / a0['seconds_per_1k']:.2f}")


if __name__ == "__main__":
    main()
