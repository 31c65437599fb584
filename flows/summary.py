"""The one-screen summary a person reads at the end of a run: what ran, skipped, failed, where to look."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipelines.core.runner import StageReport


def summary_table(reports: list[StageReport], title: str = "racm3 run") -> Table:
    t = Table(title=title, show_lines=False)
    for col in ("stage", "ran", "skipped", "failed", "rows in", "rows out", "dropped / failed rows",
                "seconds"):
        t.add_column(col, justify="right" if col not in ("stage", "dropped / failed rows") else "left")
    for r in reports:
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(r.dropped.items())) or "-"
        t.add_row(r.stage, str(len(r.ran)), str(len(r.skipped)),
                  f"[red]{len(r.failed)}[/red]" if r.failed else "0",
                  str(r.rows_in), str(r.rows_out), drops, f"{r.seconds:.1f}")
    return t


def print_summary(reports: list[StageReport], data_root: str, title: str = "racm3 run") -> None:
    console = Console(width=None if Console().is_terminal else 140)
    console.print(summary_table(reports, title))
    failed = [(r.stage, sid, err) for r in reports for sid, err in r.failed.items()]
    for stage, sid, err in failed[:10]:
        console.print(f"[red]FAILED[/red] {stage}/{sid}: {err}")
    if len(failed) > 10:
        console.print(f"... and {len(failed) - 10} more failed shards")
    console.print(f"data root: {data_root}   inspect: racm3 inspect --data-root {data_root} "
                  "\"select * from manifests\"   status: racm3 status --data-root "
                  f"{data_root}")
    if failed:
        console.print("re-run the failed stage with `racm3 run STAGE` (done shards are skipped)")
