"""What one stage run did: the counts behind the one-screen summary and the Prefect artifacts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from storage.manifest import Manifest


@dataclass
class StageReport:
    """Shards run / skipped / failed (with errors) and row counts of one stage run."""

    stage: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, m: Manifest) -> None:
        self.ran.append(m.shard_id)
        self.rows_in += m.rows_in
        self.rows_out += m.rows_out
        self.dropped.update(m.dropped)
        if m.metrics:
            self.metrics[m.shard_id] = m.metrics

    def finish(self) -> None:
        """Shards complete in any order under concurrency; report them in shard order."""
        self.ran.sort()
        self.skipped.sort()
        self.failed = dict(sorted(self.failed.items()))

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "-"
        return (f"{self.stage:<10} ran {len(self.ran):>4}  skipped {len(self.skipped):>4}  "
                f"failed {len(self.failed):>3}  rows {self.rows_in}->{self.rows_out}  "
                f"dropped: {drops}  ({self.seconds:.1f}s)")

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "ran": list(self.ran), "skipped": list(self.skipped),
                "failed": dict(self.failed), "rows_in": self.rows_in, "rows_out": self.rows_out,
                "dropped": dict(self.dropped), "metrics": self.metrics,
                "seconds": round(self.seconds, 2)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageReport:
        return cls(d["stage"], list(d["ran"]), list(d["skipped"]), dict(d["failed"]),
                   d["rows_in"], d["rows_out"], Counter(d["dropped"]), d.get("metrics", {}),
                   d["seconds"])
