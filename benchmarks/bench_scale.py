"""Scaling benchmark: the data stages at 1x, 4x and 16x documents, seconds per 1,000 documents
and peak RSS of each stage, each stage measured alone in a child `racm3 run STAGE --local`.

    python benchmarks/bench_scale.py [--entities 190] [--sizes 1,4,16] [--keep DIR]

The demo generator makes the data (`demo.entities` x size; filter shards of a fixed size, so a
shard's memory is the same at every size). Every stage is real: filter (DuckDB), download from
the demo's HTTP server on 127.0.0.1, embed (racm3-demo CLIP, random weights: speed does not
depend on them), tokenize (the demo VQGAN fitted for a few steps once, at 1x), index (Flat),
retrieve (1 query-dropout variant; the demo preset has 3). The peak RSS of a child comes from
GNU time, so it is that stage's alone (worker processes it waited for included). The child
builds only its stage's config section, so it imports only what that stage imports. Wall
seconds include the child's start-up (imports: ~30 s for torch stages on a loaded machine);
`cmp/1k` is the shards' own compute time from their manifests.

A second table scales the index alone on generated embedding shards (100k x 128 per 1x), where
its own bytes dominate the process, against the goal: index peak RSS within 1.25x of
(the 1x process + the growth of the index's bytes).

Pluggable: if benchmarks/scale_training.py exists, its `rows(root_uri, overrides, docs)`
(keyword arguments it accepts out of root_uri, root, overrides, docs, size) is called at every
size after retrieve, on the same data root, and must return dicts with `stage`, `seconds` and
`peak_rss_bytes` (or `peak_rss_mb`); they join the table and the goal lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
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

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from storage.fs import DataRoot  # noqa: E402
from storage.manifest import list_manifests  # noqa: E402

DATA_STAGES = ("filter", "download", "embed", "tokenize", "index", "retrieve")
GOAL = 1.25
TIME = "/usr/bin/time"
PORT = 18797
BASE = ["demo.eval_images=10", "demo.dev_images=10", f"demo.port={PORT}", "filter.shard_size=200",
        "embed.checkpoint=weights/clip.pt", "fit_vqgan.max_steps=5",
        "fit_vqgan.max_seconds=900",  # a safety stop only: 5 steps take seconds, more under load
        "fit_vqgan.kmeans_patches=5000", "retrieve.batch_size=256", "retrieve.variants=1", "beam.direct_num_workers=1"]


def child_main(stage: str, root_uri: str, overrides: list[str]) -> int:
    """What a child runs: `racm3 run STAGE --local`, building only the config sections the stage
    uses, so its RSS is the stage's (load_config imports every stage module: ~1.3 GB with torch)."""
    from pipelines.core.config import build, load_raw
    from pipelines.core.registry import RUN_SECTIONS, _load, get_stage
    from pipelines.core.runner import run_stage

    raw = load_raw("demo", None, [o for o in overrides if o.split(".")[0] in
                                  (stage.replace("-", "_"), *RUN_SECTIONS)])
    st = get_stage(stage)
    cfgs = {st.section: build(st.config, st.section, raw.get(st.section, {}))}
    cfgs |= {s: build(_load(ref), s, raw.get(s, {})) for s, ref in RUN_SECTIONS.items()}
    report = run_stage(stage, DataRoot(root_uri), cfgs)
    print(report.line(), flush=True)
    return 0 if report.ok else 1


def run_child(stage: str, root: DataRoot, overrides: list[str], log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one stage run in a child process.

    GNU time starts it: a child forked from this (large) process would report this process's
    pages as its own peak until it execs, whatever the stage uses.
    """
    rss_file = log.with_suffix(".rss")
    args = [TIME, "-f", "%M", "-o", str(rss_file), sys.executable, str(Path(__file__).resolve()),
            "--child", stage, root.uri, *overrides]
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        code = subprocess.call(args, stdout=out, stderr=subprocess.STDOUT, cwd=str(HERE.parent))
        dt = time.perf_counter() - t0
    if code:
        raise RuntimeError(f"{stage} failed (exit {code}); see {log}")
    return dt, int(rss_file.read_text().split()[-1]) * 1024  # GNU time reports KiB


def compute_seconds(root: DataRoot, stage: str) -> float:
    """Sum of the shards' compute time from their manifests (no interpreter start-up)."""
    return sum(m.timings.get("compute_s", 0.0) for m in list_manifests(root, stage))


def shard_median(root: DataRoot, stage: str) -> float:
    """Median over the stage's shards of compute seconds per input row: what one more shard
    costs per document, free of the run's fixed costs (which make the marginal noisy when a
    stage's whole work is a few seconds)."""
    rates = [m.timings.get("compute_s", 0.0) / m.rows_in
             for m in list_manifests(root, stage) if m.rows_in]
    return statistics.median(rates) if rates else 0.0


def write_clip(root: DataRoot) -> None:
    import torch

    from model.clip_encoder import create_clip

    torch.manual_seed(0)
    model, *_ = create_clip("racm3-demo")
    root.makedirs(root.join("weights"))
    torch.save(model.state_dict(), root.join("weights", "clip.pt"))


def prepare_main(root_uri: str, overrides: list[str], fitted_uri: str) -> int:
    """Child: demo data (not measured) and the models the measured stages load. A child, so
    that this process stays small (a stage child forked from it would start at its size)."""
    from pipelines.core.registry import load_config
    from pipelines.core.runner import run_stage

    root = DataRoot(root_uri)
    assert run_stage("demo", root, load_config("demo", overrides=overrides)).ok
    write_clip(root)
    if fitted_uri:
        shutil.copytree(DataRoot(fitted_uri).join("fit-vqgan"), root.join("fit-vqgan"))
    return 0


def prepare(root: DataRoot, overrides: list[str], fitted: DataRoot | None, log: Path) -> None:
    args = [sys.executable, str(Path(__file__).resolve()), "--prepare", root.uri,
            fitted.uri if fitted else "", *overrides]
    with open(log, "ab") as out:
        if subprocess.call(args, stdout=out, stderr=subprocess.STDOUT, cwd=str(HERE.parent)):
            raise RuntimeError(f"preparing {root.uri} failed; see {log}")


def docs_of(root: DataRoot) -> int:
    """Documents the later stages see: rows of the download shards."""
    return sum(m.rows_out for m in list_manifests(root, "download"))


def training_plugin() -> Any:
    path = HERE / "scale_training.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("scale_training", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plugin_rows(mod: Any, root: DataRoot, overrides: list[str], docs: int,
                size: int) -> list[dict[str, Any]]:
    offered = {"root_uri": root.uri, "root": root, "overrides": overrides, "docs": docs,
               "size": size}
    accepted = inspect.signature(mod.rows).parameters
    out = []
    for r in mod.rows(**{k: v for k, v in offered.items() if k in accepted}):
        rss = r.get("peak_rss_bytes") or int(r.get("peak_rss_mb", 0) * 2**20)
        out.append({"stage": r["stage"], "seconds": float(r["seconds"]), "rss": int(rss),
                    "compute": float(r.get("compute_seconds", r["seconds"]))})
    return out


def measure_size(size: int, entities: int, work: Path, fitted: DataRoot | None,
                 plugin: Any) -> tuple[DataRoot, int, list[dict[str, Any]]]:
    from pipelines.demo.paths import www_dir
    from pipelines.demo.server import serve_directory

    root = DataRoot(str(work / f"x{size}"))
    overrides = [*BASE, f"demo.entities={entities * size}"]
    log = work / f"x{size}.log"
    prepare(root, overrides, fitted, log)
    rows = []
    with serve_directory(www_dir(root), "127.0.0.1", PORT):
        for stage in DATA_STAGES:
            if stage == "tokenize" and fitted is None:  # the VQGAN is fitted once, at 1x
                run_child("fit-vqgan", root, overrides, log)
            dt, rss = run_child(stage, root, overrides, log)
            rows.append({"stage": stage, "seconds": dt, "rss": rss,
                         "compute": compute_seconds(root, stage),
                         "shard": shard_median(root, stage)})
            print(f"  x{size:<3} {stage:<9} {dt:7.1f} s  {rss / 2**20:7.0f} MiB", flush=True)
    docs = docs_of(root)
    if plugin is not None:
        rows += plugin_rows(plugin, root, overrides, docs, size)
    return root, docs, rows


def index_bytes(root: DataRoot) -> int:
    ms = [m for m in list_manifests(root, "index")]
    return int(ms[0].metrics.get("index_bytes", 0)) if ms else 0


def print_table(sizes: list[int], docs: dict[int, int], table: dict[int, list[dict[str, Any]]],
                idx_bytes: dict[int, int]) -> None:
    stages = [r["stage"] for r in table[sizes[0]]]
    head = "".join(f"  {'x' + str(s) + ' s/1k':>10} {'cmp/1k':>7} {'MiB':>6}" for s in sizes)
    print(f"\n{'stage':<10}{head}   s/doc ratio  RSS ratio  (x{sizes[-1]} / x{sizes[0]})")
    print("docs      " + "".join(f"  {docs[s]:>25,}" for s in sizes))
    for st in stages:
        cells, per_doc, rss = "", {}, {}
        for s in sizes:
            r = next(x for x in table[s] if x["stage"] == st)
            per_doc[s] = r["seconds"] / docs[s] * 1000
            rss[s] = r["rss"]
            cells += f"  {per_doc[s]:>10.2f} {r['compute'] / docs[s] * 1000:>7.2f} {rss[s] / 2**20:>6.0f}"
        a, b = sizes[0], sizes[-1]
        sr, rr = per_doc[b] / per_doc[a], rss[b] / rss[a]
        print(f"{st:<10}{cells}   {sr:>10.2f}  {rr:>9.2f}")
    print(f"\ngoals (x{sizes[-1]} vs x{sizes[0]}; 'marginal': s per extra doc from x{sizes[-2]} "
          f"to x{sizes[-1]} vs from x{sizes[0]} to x{sizes[1]}, start-up and per-shard fixed "
          f"costs cancelled):" if len(sizes) > 2 else f"\ngoals (x{sizes[-1]} vs x{sizes[0]}):")
    for st in stages:
        rs = [next(x for x in table[s] if x["stage"] == st) for s in sizes]
        ra, rb = rs[0], rs[-1]
        sr = (rb["seconds"] / docs[sizes[-1]]) / (ra["seconds"] / docs[sizes[0]])
        cr = (rb["compute"] / docs[sizes[-1]]) / max(ra["compute"] / docs[sizes[0]], 1e-12)
        line = (f"  {st:<12} s/doc wall {sr:.2f}x {ok(sr)}, compute {cr:.2f}x {ok(cr)}")
        if len(sizes) > 2:
            line += "; marginal wall " + marginal(rs, [docs[s] for s in sizes], "seconds")
            line += ", compute " + marginal(rs, [docs[s] for s in sizes], "compute")
        if ra.get("shard") and rb.get("shard"):
            mr = rb["shard"] / ra["shard"]
            line += f"; median shard s/doc {mr:.2f}x {ok(mr)}"
        if st == "index":
            allowed = ra["rss"] + idx_bytes[sizes[-1]] - idx_bytes[sizes[0]]
            rr = rb["rss"] / allowed
            line += (f"; peak RSS {rr:.2f}x of (x{sizes[0]} process + index growth "
                     f"{(idx_bytes[sizes[-1]] - idx_bytes[sizes[0]]) / 2**20:.1f} MiB)")
        else:
            rr = rb["rss"] / ra["rss"]
            line += f"; peak RSS {rr:.2f}x"
        print(f"{line} {ok(rr)} (goal <= {GOAL}x)")


def ok(ratio: float) -> str:
    return "ok" if ratio <= GOAL else "MISSED"


def marginal(rs: list[dict[str, Any]], docs: list[int], field: str) -> str:
    """Seconds per extra document between the two largest sizes over the two smallest."""
    low = (rs[1][field] - rs[0][field]) / max(docs[1] - docs[0], 1)
    high = (rs[-1][field] - rs[-2][field]) / max(docs[-1] - docs[-2], 1)
    if low <= 0:
        return f"n/a ({high * 1000:.2f} s/1k)"
    return f"{high / low:.2f}x {ok(high / low)}"


def generated_index(sizes: list[int], base: int, dim: int, work: Path) -> None:
    """The index stage alone on generated embedding shards: its bytes dominate the process."""
    import numpy as np

    from benchmarks.embed_shards import write_embed_shard

    shard = min(20_000, base)  # a small --gen-vectors still gets whole shards (make bench: 4,000)
    print(f"\n[index on generated shards] {base:,} x {dim} float32 per 1x, shards of {shard:,}")
    rows = {}
    for s in sizes:
        root = DataRoot(str(work / f"gen{s}"))
        rng = np.random.default_rng(s)
        for i in range(base * s // shard):
            x = rng.normal(size=(shard, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            write_embed_shard(root, f"{i:05d}", [f"g{i}-{j}" for j in range(shard)], x,
                              model="racm3-demo")
        dt, rss = run_child("index", root, [], work / f"gen{s}.log")
        rows[s] = (dt, rss, index_bytes(root), base * s)
        print(f"  x{s:<3} {base * s:>9,} vectors  {dt:6.1f} s  {dt / (base * s) * 1000:.3f} s/1k  "
              f"peak {rss / 2**20:6.0f} MiB  index file {rows[s][2] / 2**20:6.0f} MiB", flush=True)
        shutil.rmtree(root.path)
    a, b = sizes[0], sizes[-1]
    one_shard = shard * dim * 4  # the doc_emb column of one shard
    allowed = rows[a][1] + rows[b][2] - rows[a][2]
    print(f"  goal: peak RSS x{b} {rows[b][1] / 2**20:.0f} MiB = {rows[b][1] / allowed:.2f}x of "
          f"(x{a} process {rows[a][1] / 2**20:.0f} MiB + index growth "
          f"{(rows[b][2] - rows[a][2]) / 2**20:.0f} MiB) "
          f"{'ok' if rows[b][1] <= GOAL * allowed else 'MISSED'} (goal <= {GOAL}x; one shard "
          f"is {one_shard / 2**20:.0f} MiB); s/doc {rows[b][0] / rows[b][3] / (rows[a][0] / rows[a][3]):.2f}x")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child_main(sys.argv[2], sys.argv[3], sys.argv[4:]))
    if sys.argv[1:2] == ["--prepare"]:
        sys.exit(prepare_main(sys.argv[2], sys.argv[4:], sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--entities", type=int, default=190, help="demo entities at 1x (~650 docs)")
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--gen-vectors", type=int, default=100_000, help="generated index rows at 1x")
    ap.add_argument("--gen-dim", type=int, default=128)
    ap.add_argument("--keep", help="keep the data roots in this folder")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.keep or tempfile.mkdtemp(prefix="racm3-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    plugin = training_plugin()
    print(f"[scale] sizes {sizes} x {args.entities} demo entities; data in {work}; "
          f"training rows: {'benchmarks/scale_training.py' if plugin else 'none (no plugin)'}")
    print(f"[scale] load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} on {os.cpu_count()} cores")
    t0 = time.time()
    docs, table, idx = {}, {}, {}
    fitted = None
    try:
        for s in sizes:
            root, docs[s], table[s] = measure_size(s, args.entities, work, fitted, plugin)
            idx[s] = index_bytes(root)
            fitted = fitted or root
        print_table(sizes, docs, table, idx)
        generated_index(sizes, args.gen_vectors, args.gen_dim, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"[scale] {time.time() - t0:.0f} s in all; load now {os.getloadavg()[0]:.2f}")
    print(json.dumps({"docs": docs}))


if __name__ == "__main__":
    main()
