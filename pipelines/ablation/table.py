"""The ablation table: each row's perplexities beside the paper's, whether its direction against its
reference row agrees, as Markdown and one HTML page (the evaluation report's tables and style)."""

from __future__ import annotations

import html
import math
from typing import Any

from pipelines.ablation.variants import Variant
from pipelines.evaluation.report import STYLE, html_table, md_table


def direction(a: float, b: float) -> int:
    """Sign of a - b, 0 when either is missing or they are equal."""
    if not (math.isfinite(a) and math.isfinite(b)) or a == b:
        return 0
    return 1 if a > b else -1


def rows(variants: list[Variant], results: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """Each row beside the paper's, with whether its direction against `against` agrees."""
    by = {v.name: v for v in variants}
    out = []
    for v in variants:
        mine = results.get(v.name, (math.nan, math.nan))
        ref = by.get(v.against)
        row: dict[str, Any] = {"table": v.table, "variant": v.name, "label": v.label,
                               "ours_image_ppl": mine[0], "ours_text_ppl": mine[1],
                               "paper_image_ppl": v.paper[0] if v.paper else None,
                               "paper_text_ppl": v.paper[1] if v.paper else None,
                               "against": v.against if ref and ref is not v else None}
        if ref is not None and ref is not v:
            theirs = results.get(ref.name, (math.nan, math.nan))
            for i, k in enumerate(("image", "text")):
                our_dir = direction(mine[i], theirs[i])
                if v.paper and ref.paper:  # the paper's sign of (row - reference)
                    paper_dir = direction(v.paper[i], ref.paper[i])
                elif v.table == "Fig 9":  # RA-CM3 below vanilla at every size
                    paper_dir = -1 if v.model == "ra-cm3" else 1
                else:
                    paper_dir = 0
                row[f"{k}_agrees"] = None if 0 in (our_dir, paper_dir) else our_dir == paper_dir
        out.append(row)
    return out


def fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


HEADER = ["table", "variant", "ours image ppl", "paper image ppl", "image agrees",
          "ours text ppl", "paper text ppl", "text agrees", "vs"]


def cells(r: dict[str, Any]) -> list[str]:
    return [r["table"], r["label"], fmt(r["ours_image_ppl"]), fmt(r["paper_image_ppl"]),
            fmt(r.get("image_agrees")), fmt(r["ours_text_ppl"]), fmt(r["paper_text_ppl"]),
            fmt(r.get("text_agrees")), r["against"] or ""]


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [md_table(HEADER, [cells(r) for r in table])]
    agree = [r[k] for r in table for k in ("image_agrees", "text_agrees") if r.get(k) is not None]
    lines += ["", f"Directions that agree with the paper: {sum(agree)} of {len(agree)} "
              f"(each row against the `vs` row; Fig 9: RA-CM3 below vanilla at each size)."]
    return "\n".join(lines)


def svg_bars(table: list[dict[str, Any]], key: str, width: int = 760) -> str:
    """Horizontal bars of ours (red) and the paper's (grey), each relative to its `vs` row."""
    items = []
    by = {r["variant"]: r for r in table}
    for r in table:
        ref = by.get(r["against"] or "")
        if ref is None:
            continue
        ours_rel = rel(r[f"ours_{key}"], ref[f"ours_{key}"])
        paper_rel = rel(r[f"paper_{key}"], ref[f"paper_{key}"])
        items.append((r["label"], ours_rel, paper_rel))
    h, pad, mid = 18 * 2 * len(items) + 40, 300, 300 + (width - 300) / 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}">',
             f'<text x="{mid}" y="14" text-anchor="middle" font-size="12">{key}: row / its vs '
             f'row - 1 (red ours, grey paper; right = worse)</text>',
             f'<line x1="{mid}" y1="20" x2="{mid}" y2="{h}" stroke="#444"/>']
    scale = (width - pad) / 2 / max([abs(x) for _, a, b in items for x in (a, b)
                                     if math.isfinite(x)] + [0.05])
    for i, (label, a, b) in enumerate(items):
        y = 24 + 36 * i
        parts.append(f'<text x="{pad - 6}" y="{y + 14}" text-anchor="end" font-size="10">'
                     f'{html.escape(label[:48])}</text>')
        for j, (val, colour) in enumerate(((a, "#d62728"), (b, "#999"))):
            if math.isfinite(val):
                x0, x1 = sorted((mid, mid + val * scale))
                parts.append(f'<rect x="{x0:.1f}" y="{y + 16 * j}" width="{max(x1 - x0, 1):.1f}" '
                             f'height="14" fill="{colour}"/>')
    return "".join(parts) + "</svg>"


def rel(a: Any, b: Any) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return a / b - 1


def html_page(table: list[dict[str, Any]]) -> str:
    """One self-contained page, in the evaluation report's table and style."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>racm3 ablations</title>"
            f"<style>{STYLE}</style></head><body><h1>RA-CM3 ablations at demo scale</h1>"
            f"{html_table(HEADER, [cells(r) for r in table])}"
            f"<h2>Directions</h2>{svg_bars(table, 'image_ppl')}{svg_bars(table, 'text_ppl')}"
            f"<p>{html.escape(markdown(table).splitlines()[-1])}</p></body></html>")
