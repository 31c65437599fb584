"""Benchmark the embed stage (Beam, shard contract) against a plain batched open_clip loop.

    python benchmarks/bench_embed.py [--docs 1000] [--shards 4] [--modes auto,multi_processing]
                                     [--batch-size 64] [--model racm3-tiny --checkpoint F]
                                     [--repeats 2]

Both sides encode the same download shard (decode JPEG, preprocess, encode_image, encode_text) with
the same model, batch size and threads; the stage also reads/writes Parquet, mixes doc_emb, and
runs the whole stage (plan, model load, shard contract, manifest) on its default runner (one
shard: a thread of this process). Loop and stage alternate `--repeats` times, best of each (the
first stage run also pays lazy imports). Throughput is (images + texts) / s; the ratio is
stage / loop (goal >= 0.87).

Then the same rows in `--shards` shards, the whole stage run on all cores (one DirectRunner worker
per core) in each of `--modes`, against the shards' own compute per worker (goal >= 0.9x: the
rest is orchestration: worker start-up, pipeline, manifests).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.download_shards import make_download_shard  # noqa: E402
from benchmarks.stage_overhead import compare_modes  # noqa: E402
from model.clip_encoder import create_clip  # noqa: E402
from pipelines.core.runconfig import BeamConfig, RunConfig  # noqa: E402
from pipelines.core.runner import run_stage  # noqa: E402
from pipelines.retrieval.embed import EmbedConfig  # noqa: E402
from storage.fs import DataRoot  # noqa: E402
from storage.manifest import read_manifest  # noqa: E402
from storage.shards import read_table  # noqa: E402


@torch.no_grad()
def plain_loop(model_name: str, ckpt: str, rows: list[dict], batch: int) -> float:
    """Seconds for the baseline: the shortest batched open_clip loop over the same rows."""
    model, _, preprocess, tok = create_clip(model_name, ckpt)
    model.eval()
    t0 = time.perf_counter()
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        ims = torch.stack([preprocess(Image.open(io.BytesIO(r["jpg"])).convert("RGB")) for r in chunk])
        model.encode_image(ims, normalize=True)
        model.encode_text(tok([r["caption"] for r in chunk]), normalize=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="racm3-tiny")
    ap.add_argument("--checkpoint", default="", help="open_clip state dict (default: random init)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of loop and stage")
    ap.add_argument("--shards", type=int, default=4, help="shards of the all-cores runs")
    ap.add_argument("--modes", default="auto,multi_processing",
                    help="beam.direct_running_mode of each all-cores run ('' none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = DataRoot(f"{tmp}/one")
        ckpt = args.checkpoint
        if not ckpt:
            model, *_ = create_clip(args.model)
            ckpt = f"{tmp}/clip.pt"
            torch.save(model.state_dict(), ckpt)
        make_download_shard(root, "00000", n=args.docs, size=256)
        rows = read_table(root, root.artifact("download", "00000", "parquet")).to_pylist()
        cfgs = {"run": RunConfig(retries=0), "beam": BeamConfig(),
                "embed": EmbedConfig(model=args.model, checkpoint=ckpt,
                                     batch_size=args.batch_size, threads=args.threads)}
        bases, walls, computes = [], [], []
        for r in range(args.repeats):  # alternate: load drift on a shared machine hits both alike
            bases.append(plain_loop(args.model, ckpt, rows, args.batch_size))
            t0 = time.perf_counter()
            report = run_stage("embed", root, cfgs, force=r > 0)
            walls.append(time.perf_counter() - t0)
            assert report.ok, report.failed
            computes.append(read_manifest(root, "embed", "00000").timings["compute_s"])
        items, loop, best = 2 * args.docs, min(bases), walls.index(min(walls))
        stage_wall, compute = walls[best], computes[best]
        print(f"embed {args.docs} docs ({args.model}, batch {args.batch_size}, {args.threads} "
              f"thread(s) per worker)")
        print(f"  plain open_clip loop : {items / loop:8.1f} items/s (best of "
              f"{', '.join(f'{b:.2f}' for b in bases)} s)")
        print(f"  stage, shard compute : {items / compute:8.1f} items/s ({compute:.2f}s)  "
              f"ratio {loop / compute:.2f}x")
        print(f"  stage, whole run     : {items / stage_wall:8.1f} items/s (best of "
              f"{', '.join(f'{w:.2f}' for w in walls)} s; its compute {compute:.2f} s = "
              f"{compute / stage_wall:.2f}x of the whole run)  "
              f"ratio {loop / stage_wall:.2f}x  (goal >= 0.87)", flush=True)
        many, per = DataRoot(f"{tmp}/many"), args.docs // args.shards
        for i in range(args.shards):  # the same number of documents in several shards
            make_download_shard(many, f"{i:05d}", n=per, size=256, start=i * per)
        print(f"  all cores ({os.cpu_count()} workers), {per * args.shards} docs:")
        compare_modes("embed", many, cfgs, [m for m in args.modes.split(",") if m],
                      2 * per * args.shards, "items")

if __name__ == "__main__":
    main()
