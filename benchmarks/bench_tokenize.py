"""Benchmark tokenize: images/s of the Beam stage vs a plain batched VQGAN encode loop, same shard, same run.

Usage: python benchmarks/bench_tokenize.py [--images 800] [--image-size 32] [--repeats 2]
                                          [--shards 4] [--modes auto,multi_processing]
Prints both rates, their ratio (goal >= 0.87x) and peak RSS of this process (the Beam worker runs
in-process under the DirectRunner, so it is the worker's peak too). Then the same images in
`--shards` shards, the whole stage run on all cores in each of `--modes`, against the shards' own
compute per worker (goal >= 0.9x).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.download_shards import make_download_shard  # noqa: E402
from benchmarks.stage_overhead import compare_modes  # noqa: E402
from model.images import load_image, to_tensor  # noqa: E402
from model.text_tokenizer import train_bpe  # noqa: E402
from model.vqgan import VQGAN, save_checkpoint  # noqa: E402
from pipelines.core.runconfig import BeamConfig, RunConfig  # noqa: E402
from pipelines.core.runner import run_stage  # noqa: E402
from pipelines.demo.fit_vqgan import FitVQGANConfig  # noqa: E402
from pipelines.tokens.tokenize import TokenizeConfig  # noqa: E402
from pipelines.tokens.tokenizers import load_tokenizers  # noqa: E402
from storage.fs import DataRoot  # noqa: E402
from storage.shards import read_table  # noqa: E402


def plain_loop(root: DataRoot, cfg: TokenizeConfig) -> float:
    """The baseline: read the shard, decode JPEGs, batched encode; no shard contract, no Beam."""
    t0 = time.perf_counter()
    tok = load_tokenizers(root, cfg)
    t = read_table(root, root.artifact("download", "00000", "parquet"), ["jpg", "status"]).to_pydict()
    imgs = np.stack([load_image(j, cfg.image_size) for j, s in zip(t["jpg"], t["status"], strict=True)
                     if s == "success"])
    for s in range(0, len(imgs), cfg.batch_size):
        tok.vqgan.encode(to_tensor(imgs[s:s + cfg.batch_size]))
    return len(imgs) / (time.perf_counter() - t0)


def beam_stage(root: DataRoot, cfg: TokenizeConfig, n: int) -> float:
    cfgs = {"tokenize": cfg, "run": RunConfig(), "beam": BeamConfig()}
    t0 = time.perf_counter()
    report = run_stage("tokenize", root, cfgs, force=True)
    assert report.ok, report.failed
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shards", type=int, default=4, help="shards of the all-cores runs")
    ap.add_argument("--modes", default="auto,multi_processing",
                    help="beam.direct_running_mode of each all-cores run ('' none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        root = DataRoot(d)
        make_download_shard(root, "00000", n=args.images)
        fit = FitVQGANConfig(image_size=args.image_size)
        ckpt = f"{d}/vqgan.ckpt"
        save_checkpoint(VQGAN(fit.vqgan()), ckpt)  # random weights: speed does not depend on them
        train_bpe(["a photo of the zorvik"] * 10, 64, f"{d}/bpe.json")
        cfg = TokenizeConfig(checkpoint=ckpt, text_tokenizer=f"{d}/bpe.json",
                             image_size=args.image_size, factor=fit.factor,
                             codebook_size=fit.codebook_size, threads=args.threads)
        for r in range(args.repeats):  # alternate so load drift on a shared machine hits both alike
            base = plain_loop(root, cfg)
            beam = beam_stage(root, cfg, args.images)
            print(f"run {r}: plain loop {base:8.1f} img/s   beam stage {beam:8.1f} img/s   "
                  f"ratio {beam / base:.2f}x", flush=True)
        many, per = DataRoot(f"{d}/many"), args.images // args.shards
        for i in range(args.shards):
            make_download_shard(many, f"{i:05d}", n=per, start=i * per)
        print(f"all cores ({os.cpu_count()} workers), {per * args.shards} images:")
        compare_modes("tokenize", many, {"tokenize": cfg, "run": RunConfig()},
                      [m for m in args.modes.split(",") if m], per * args.shards, "img")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS (driver + in-process DirectRunner worker): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
