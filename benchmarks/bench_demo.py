"""Benchmark: the whole demo end to end. Prints wall time per stage and the share of the run that
is orchestration (Prefect, Beam, process start-up) rather than stage work (goal <= 10%).

Stage work is what the manifests record as each shard's compute time; everything else in the
wall time of `racm3 demo` is orchestration. Takes ~10-15 minutes on 2 cores."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from storage.fs import DataRoot
from storage.manifest import list_manifests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--until", help="stop after this stage (a shorter benchmark)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cmd = [str(Path(sys.executable).parent / "racm3"), "demo", "--data-root", d]
        if args.until:
            cmd += ["--until", args.until]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        work: dict[str, float] = defaultdict(float)
        for m in list_manifests(DataRoot(d)):
            work[m.stage] += m.timings.get("compute_s", 0.0)
    total = sum(work.values())
    for stage, secs in sorted(work.items(), key=lambda kv: -kv[1]):
        print(f"demo: {stage:<15} {secs:8.1f} s stage work")
    print(f"demo: wall {wall:.1f} s, stage work {total:.1f} s, orchestration {wall - total:.1f} s "
          f"= {(wall - total) / wall:.1%} of the run (goal <= 10%)")


if __name__ == "__main__":
    main()
