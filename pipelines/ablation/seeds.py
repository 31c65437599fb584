"""Statistics over demo seeds: mean, sd (n-1) and n of every model metric and paired difference."""

from __future__ import annotations

from typing import Any


def over_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """mean, sd (n-1) and n over seeds of every model metric and paired difference."""
    import numpy as np

    values: dict[tuple[str, str], list[float]] = {}
    separated: dict[tuple[str, str], list[int]] = {}  # per paired difference: its sign where the interval excludes 0
    for m in per_seed.values():
        for model, d in m["models"].items():
            for k, v in d.items():
                if not k.endswith("_n"):
                    values.setdefault((model, k), []).append(float(v))
        for pair, d in (m.get("differences") or {}).items():
            for k, v in d.items():
                values.setdefault((pair, k), []).append(float(v["value"]))
                sep = separated.setdefault((pair, k), [])
                if v.get("separates"):
                    sep.append(1 if v["value"] > 0 else -1)
    out: dict[str, Any] = {}
    for (group, k), vs in values.items():
        arr = np.asarray(vs)
        out.setdefault(group, {})[k] = {"mean": round(float(arr.mean()), 4), "n": len(vs),
                                        "sd": round(float(arr.std(ddof=1)), 4) if len(vs) > 1 else None}
        if (group, k) in separated:  # how many seeds' paired intervals exclude 0, by sign
            signs = separated[(group, k)]
            out[group][k] |= {"above_0": signs.count(1), "below_0": signs.count(-1)}
    return out


def metric_key(have: dict[str, Any], column: str) -> str | None:
    """The name `column` has among `have`'s metrics: itself, or for "FID" / "KID" the judge's
    spelling (FID-EffNetLite0, KID(EffNetLite0), ...)."""
    if column in have:
        return column
    if column in ("FID", "KID"):
        return next((k for k in have if k.startswith(column)), None)
    return None


def fmt_cell(c: dict[str, Any] | None) -> str:
    """`mean ± sd` (n-1), with (a↓ b↑ of n) for a paired difference; "—" when absent."""
    if c is None:
        return "—"
    out = f"{c['mean']:.4g}" + (f" ± {c['sd']:.2g}" if c["sd"] is not None else "")
    if "above_0" in c:
        out += f" ({c['below_0']}↓ {c['above_0']}↑ of {c['n']})"
    elif c["n"] < 3:
        out += f" (n={c['n']})"
    return out


def mean_sd(values: list[float]) -> str:
    """A table cell over seeds: mean ± sd of the values ("—" when none)."""
    import numpy as np

    if not values:
        return "—"
    arr = np.asarray(values, np.float64)
    return fmt_cell({"mean": float(arr.mean()), "n": len(arr),
                     "sd": float(arr.std(ddof=1)) if len(arr) > 1 else None})


def seeds_markdown(summary: dict[str, Any], seeds: list[int]) -> str:
    groups = list(summary)
    names: list[str] = []
    for g in groups:
        names += [k for k in summary[g] if k not in names]
    lines = [f"Mean ± sd over seeds {', '.join(map(str, seeds))} (test split). For a paired "
             f"difference, (a↓ b↑ of n): seeds whose 95% bootstrap interval lies wholly below / "
             f"above 0.", "",
             "| metric | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 1)]
    for n in names:
        cells = []
        for g in groups:
            c = summary[g].get(n)
            cells.append("—" if c is None else f"{c['mean']:.4g}" + (f" ± {c['sd']:.2g}" if c["sd"] is not None else "")
                         + (f" ({c['below_0']}↓ {c['above_0']}↑ of {c['n']})" if "above_0" in c else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
