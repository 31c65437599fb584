"""Run every benchmark script in this folder, one after another, and print their ratio lines.

    python benchmarks/run_all.py [--full] [--only NAME[,NAME]]

By default each script runs at small sizes (a few minutes in all on 2 cores) so `make bench`
checks that every benchmark runs from a fresh clone; `--full` uses each script's own defaults
(the sizes the issue's numbers come from; the demo alone takes 10-15 minutes). The repository
root is put on the children's PYTHONPATH on purpose: the scripts import this checkout.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMALL: dict[str, list[str]] = {  # script -> arguments for the quick run
    "bench_demo.py": ["--until", "download"],
    "bench_download.py": ["--entities", "300", "--threads", "4", "--no-processes"],
    "bench_embed.py": ["--docs", "64", "--batch-size", "32"],
    "bench_filter.py": ["--rows", "50000"],
    "bench_fit_vqgan.py": ["--steps", "4", "--repeats", "1"],
    "bench_gpu.py": ["--quick"],
    "bench_index.py": ["--n", "20000", "--queries", "200", "--ivf", "IVF64,PQ8", "--nprobe", "4"],
    "bench_memory.py": ["--sizes", "20000,80000", "--queries", "200"],
    "bench_pack.py": ["--sizes", "1,4", "--old-sizes", "1,4"],
    "bench_retrieve.py": ["--queries", "200"],
    "bench_sampling.py": ["--repeat", "1", "--new", "16"],
    "bench_scale.py": ["--entities", "40", "--sizes", "1,2", "--gen-vectors", "4000"],
    "bench_tokenize.py": ["--images", "64", "--repeats", "1"],
    "bench_train.py": ["--steps", "4", "--repeats", "1"],
    "bench_train_settings.py": ["--steps", "4", "--docs", "600", "--settings", "default,ddp2x1-bf16"],
}
RATIO = re.compile(r"\d\.\d+\s*x|\d+(\.\d+)?%|goal|MFU|/s\b", re.IGNORECASE)


def run(script: Path, args: list[str]) -> tuple[int, list[str], float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p),
        "NO_ALBUMENTATIONS_UPDATE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=HERE.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if RATIO.search(line) and " INFO " not in line:
            lines.append(line.rstrip())
    return proc.wait(), lines, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="each script's own default sizes")
    ap.add_argument("--only", default="", help="comma-separated script names (bench_x or x)")
    args = ap.parse_args()
    only = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only.split(",") if n}
    scripts = [s for s in sorted(HERE.glob("bench_*.py")) if not only or s.stem in only]
    failed, summary = [], []
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        code, lines, secs = run(script, [] if args.full else SMALL.get(script.name, []))
        summary.append(f"--- {script.name}: {'ok' if code == 0 else f'FAILED ({code})'}, "
                       f"{secs:.0f} s")
        summary.extend(f"    {line}" for line in lines)
        if code:
            failed.append(script.name)
    print("=== ratios (same-run measurements; load: " + " ".join(
        f"{x:.2f}" for x in os.getloadavg()) + ")")
    print("\n".join(summary))
    print(f"=== {len(scripts) - len(failed)} benchmarks ran, {len(failed)} failed {failed or ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
