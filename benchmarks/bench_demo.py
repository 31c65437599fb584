"""Benchmark: the whole demo end to end. Prints wall time per stage and the share of the run that
is orchestration (Prefect, Beam, process start-up) rather than stage work (goal <= 10%).

Stage work is what the manifests record as each shard's compute time; everything else in the
wall time of `racm3 demo` is orchestration. Takes ~10-15 minutes on 2 cores."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from storage.fs import DataRoot  # noqa: E402
from storage.manifest import list_manifests  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--until", help="stop after this stage (a shorter benchmark)")
    ap.add_argument("--prefect-startup-s", type=float, default=600.0,
                    help="budget of the temporary Prefect server's start-up (unless "
                         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is set)")
    ap.add_argument("--timeout-s", type=float, default=3600.0,
                    help="fail (with the demo's last output) if it has not exited by then")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        # this checkout's CLI (the installed `racm3` script may import another copy)
        cmd = [sys.executable, "-m", "flows.cli", "demo", "--data-root", d]
        if args.until:
            cmd += ["--until", args.until]
        t0 = time.perf_counter()
        # The temporary Prefect server's start-up budget (the CLI's default 90 s) is not enough on
        # a loaded machine, where a niced benchmark's server can take minutes to answer.
        env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(int(args.prefect_startup_s)),
               **os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                  text=True, timeout=args.timeout_s)
        except subprocess.TimeoutExpired as e:  # a hang (e.g. a server that will not stop) fails
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
            print((out or "")[-3000:], file=sys.stderr)
            raise SystemExit(f"bench_demo: `{' '.join(cmd)}` still running after "
                             f"{args.timeout_s:.0f} s (--timeout-s); load "
                             f"{os.getloadavg()[0]:.1f}") from None
        if proc.returncode:  # say why, not just that it failed
            print(proc.stdout[-3000:], file=sys.stderr)
            raise SystemExit(f"bench_demo: `{' '.join(cmd)}` exited {proc.returncode}")
        wall = time.perf_counter() - t0
        work: dict[str, float] = defaultdict(float)
        for m in list_manifests(DataRoot(d)):
            work[m.stage] += m.timings.get("compute_s", 0.0)
    total = sum(work.values())
    for stage, secs in sorted(work.items(), key=lambda kv: -kv[1]):
        print(f"demo: {stage:<15} {secs:8.1f} s stage work")
    print(f"demo: wall {wall:.1f} s, stage work {total:.1f} s, orchestration {wall - total:.1f} s "
          f"= {(wall - total) / wall:.1%} of the run (goal <= 10%); load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
