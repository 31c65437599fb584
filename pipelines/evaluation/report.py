"""The evaluation report: metrics table with 95% intervals and paired differences, training loss
curves (hand-drawn SVG from Lightning's CSV logs) and image grids, as Markdown (figures beside it)
and one self-contained HTML page. Figures are drawn by the part shards (`showcase`); the page is
written by the reduce step from those records alone (no models needed)."""

from __future__ import annotations

import base64
import csv
import html
import io
import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from storage.fs import DataRoot
from storage.manifest import read_manifest

if TYPE_CHECKING:
    from pipelines.core.stage import ShardContext
    from pipelines.evaluation.per_image import Example
    from pipelines.inference.loader import Inference

CURVES = ("l_main", "l_image", "l_text")  # main-document losses: comparable across variants
COLOURS = {"ra-cm3": "#d62728", "vanilla": "#1f77b4"}
LOWER_IS_BETTER = ("FID", "KID", "ppl")
THUMB = 96  # displayed side of every image in the grids

Curves = dict[str, dict[str, list[tuple[int, float]]]]  # variant -> metric -> [(step, value)]


# ---------------------------------------------------------------------------- loss curves


def loss_curves(root: DataRoot) -> Curves:
    """Per variant, the logged losses by step from `<train workdir>/logs/version_*/metrics.csv`
    (later versions, i.e. resumed runs, win for a step)."""
    out: Curves = {}
    for variant in ("ra-cm3", "vanilla"):
        m = read_manifest(root, "train", variant)
        if m is None or not m.metrics.get("checkpoints"):
            continue
        logs = root.join(m.metrics["checkpoints"], "logs")
        files = sorted(root.fs.glob(posixpath.join(logs, "version_*", "metrics.csv")),
                       key=lambda p: int(p.rsplit("version_", 1)[1].split("/")[0]))
        rows: dict[str, dict[int, float]] = {c: {} for c in CURVES}
        for path in files:
            with root.fs.open(path, "r") as f:
                for r in csv.DictReader(f):
                    for c in CURVES:
                        if r.get(c) and r.get("step"):
                            rows[c][int(float(r["step"]))] = float(r[c])
        out[variant] = {c: sorted(v.items()) for c, v in rows.items() if v}
    return out


def svg_chart(curves: Curves, metric: str, width: int = 360, height: int = 220) -> str:
    """One line per variant of `metric` against step, with axes and a legend, as inline SVG."""
    series = {v: d[metric] for v, d in curves.items() if d.get(metric)}
    if not series:
        return ""
    xs = [s for pts in series.values() for s, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-6)
    pad = 40

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - pad - 10)

    def sy(y: float) -> float:
        return height - pad + (y0 - y) / (y1 - y0) * (height - pad - 20)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="12">{metric}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#444"/>',
             f'<line x1="{pad}" y1="20" x2="{pad}" y2="{height - pad}" stroke="#444"/>']
    for val, y in ((y0, sy(y0)), (y1, sy(y1))):
        parts.append(f'<text x="{pad - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{val:.2f}</text>')
    parts.append(f'<text x="{width - 10}" y="{height - pad + 14}" text-anchor="end" font-size="10">'
                 f'step {x1}</text>')
    for i, (variant, pts) in enumerate(series.items()):
        colour = COLOURS.get(variant, "#333")
        line = " ".join(f"{sx(s):.1f},{sy(y):.1f}" for s, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{line}"/>')
        parts.append(f'<text x="{width - 12}" y="{32 + 14 * i}" text-anchor="end" font-size="11" '
                     f'fill="{colour}">{variant}</text>')
    return "".join(parts) + "</svg>"


# ---------------------------------------------------------------------------- images


def thumb(image: Image.Image | None, label: str = "") -> Image.Image:
    """A THUMB x THUMB tile (nearest upscaling keeps the VQGAN's pixels visible), grey if None."""
    tile = Image.new("RGB", (THUMB, THUMB + 14), "white")
    if image is not None:
        tile.paste(image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.NEAREST), (0, 0))
    else:
        ImageDraw.Draw(tile).rectangle([0, 0, THUMB - 1, THUMB - 1], fill="#ccc")
    ImageDraw.Draw(tile).text((2, THUMB + 1), label[:16], fill="black")
    return tile


def row_image(tiles: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (len(tiles) * (THUMB + 4), THUMB + 14), "white")
    for i, t in enumerate(tiles):
        out.paste(t, (i * (THUMB + 4), 0))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def text_to_image_row(setup: Inference, ex: Example) -> Image.Image:
    """Retrieved documents' images (by the caption), then each model's kept image, then the real one."""

    tiles = [thumb(setup.memory_image(k), f"retrieved {i + 1}") for i, k in enumerate(ex.by_caption)]
    tiles += [thumb(ex.images.get(m), label) for m, label in
              (("ra-cm3", "RA-CM3"), ("vanilla", "vanilla"), ("retrieval-baseline", "baseline"))]
    return row_image(tiles + [thumb(ex.real, "real")])


def retrieved_text(setup: Inference, keys: list[str]) -> str:
    return "; ".join(f"“{setup.captions.get(k, k)}”" for k in keys) or "(none)"


def showcase(setup: Inference, ex: Example, fig_dir: str, root: DataRoot) -> dict[str, Any]:
    """Write one example's two figures into fig_dir; its texts for the report."""
    pos = ex.item.position
    figs = {f"t2i_{pos}.png": text_to_image_row(setup, ex),
            f"i2t_{pos}.png": thumb(ex.real, f"image {ex.item.image_id}")}
    root.makedirs(fig_dir)
    for name, image in figs.items():
        with root.fs.open(posixpath.join(fig_dir, name), "wb") as f:
            f.write(png_bytes(image))
    return {"position": pos, "image_id": ex.item.image_id, "caption": ex.caption,
            "refs": ex.item.captions, "captions": dict(ex.captions),
            "retrieved_by_caption": retrieved_text(setup, ex.by_caption),
            "retrieved_by_image": retrieved_text(setup, ex.by_image),
            "documents": {"caption": list(ex.by_caption), "image": list(ex.by_image)},
            "t2i": f"t2i_{pos}.png", "i2t": f"i2t_{pos}.png"}


# ---------------------------------------------------------------------------- tables


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def metric_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the models-side-by-side table; a metric a model lacks shows as '—'."""
    models = list(metrics["models"])
    names: list[str] = []
    for d in metrics["models"].values():
        names += [k for k in d if k not in names]
    rows = []
    for n in names:
        hint = " ↓" if any(t in n for t in LOWER_IS_BETTER) else (" ↑" if "_n" not in n else "")
        rows.append([n + hint] + [cell(metrics, m, n) for m in models])
    return ["metric", *models], rows


def cell(metrics: dict[str, Any], model: str, name: str) -> str:
    """`value [lo, hi]` (the 95% bootstrap interval when there is one), '—' when absent."""
    if name not in metrics["models"][model]:
        return "—"
    iv = metrics.get("intervals", {}).get(model, {}).get(name)
    v = fmt(metrics["models"][model][name])
    return f"{v} [{fmt(iv[0])}, {fmt(iv[1])}]" if iv else v


def difference_cell(metrics: dict[str, Any], pair: str, name: str | None,
                    star: bool = True) -> str:
    """A paired difference as `value [lo, hi]` (with `star`, " *" when the interval excludes
    0), '—' when absent."""
    d = (metrics.get("differences") or {}).get(pair, {}).get(name or "")
    if not d:
        return "—"
    return f"{d['value']:.4g} [{d['lo']:.4g}, {d['hi']:.4g}]" + (
        " *" if star and d.get("separates") else "")


def difference_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Paired differences (same resampled images) with their intervals."""
    diffs = metrics.get("differences") or {}
    if not diffs:
        return None
    rows = [[pair, name, fmt(d["value"]), f"[{fmt(d['lo'])}, {fmt(d['hi'])}]",
             "yes" if d["separates"] else "no"]
            for pair, ds in diffs.items() for name, d in ds.items()]
    return ["difference", "metric", "value", "95% interval", "excludes 0"], rows


MD_SPECIAL = "\\`*_{}[]()#+-.!|<>~"


def md_escape(text: str) -> str:
    """Web text as literal Markdown: every character Markdown (or raw HTML in it) would read
    is backslash-escaped, and line breaks become spaces, so a caption cannot format, link or
    embed anything."""
    flat = " ".join(str(text).split())
    return "".join("\\" + c if c in MD_SPECIAL else c for c in flat)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def facts(metrics: dict[str, Any]) -> list[str]:
    """Counts a reader needs to trust the numbers: split skips, leakage guard, settings."""
    s, g, st = metrics["split"], metrics["leakage_guard"], metrics["settings"]
    skips = ", ".join(f"{k.removeprefix('skipped_').replace('_', ' ')}: {v}"
                      for k, v in s.items() if k.startswith("skipped_"))
    return [f"Split: {s['usable_images']} usable of {s['images_listed']} images listed, "
            f"{s['annotations']} annotations; skipped — {skips}. Evaluated {st['images']} images.",
            f"Leakage guard: {g['excluded_memory_docs']} memory documents excluded from retrieval "
            f"({g['image_near_duplicates']} image near-duplicates above {g['image_threshold']}, "
            f"{g['text_near_duplicates']} caption near-duplicates above {g['text_threshold']}).",
            f"Settings: K = {st['k']} retrieved documents, {st['image_samples']} images per caption "
            f"(best by CLIP score), {st['caption_samples']} captions per image (lowest perplexity)"
            + (f"; context = {st['context']}" if st.get("context", "retrieved") != "retrieved" else "")
            + (f"; caption guidance w = {st['guidance']:g}" if st.get("guidance") else "") + ".",
            f"Image distance features: {metrics['fid_features']}"
            + ("" if metrics["fid_features"] == "FID" else
               " — a substitute for Inception-v3, not comparable to published FID."),
            "CIDEr-D is x100 as in the paper's tables; perplexities: image ppl retrieves with the "
            "caption (caption first), text ppl with the image, scored in the infilling form (image "
            "first, then the caption) for every model; `text ppl (caption first)` for comparison. "
            "[lo, hi]: 95% bootstrap interval over test images.",
            f"KID: unbiased MMD^2 (cubic polynomial kernel) on the same features as "
            f"{metrics['fid_features']}."]


def recall_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    rec = metrics.get("retrieval_recall")
    if not rec:
        return None
    tasks = [t for t in rec if isinstance(rec[t], dict)]
    ks = list(rec[tasks[0]])
    return ["task", *ks], [[t] + [fmt(rec[t][k]) for k in ks] for t in tasks]


# ---------------------------------------------------------------------------- writing


def write_report(ctx: ShardContext, metrics: dict[str, Any], show: list[dict[str, Any]],
                 curves: Curves) -> None:
    """main.report.md (+ main.figures/), main.report.html (images and charts inlined)."""
    root = ctx.root
    fig_dir = ctx.output_path("figures")
    root.makedirs(fig_dir)
    figs: dict[str, bytes] = {}
    for ex in show:
        for name in (ex["t2i"], ex["i2t"]):
            with root.fs.open(posixpath.join(ex["figures"], name), "rb") as f:
                figs[name] = f.read()
            with root.fs.open(posixpath.join(fig_dir, name), "wb") as f:
                f.write(figs[name])
    charts = [c for c in (svg_chart(curves, m) for m in CURVES) if c]
    extra = [decontamination_section(root, metrics), sources_section(ctx, show)]
    with root.fs.open(ctx.output_path("report.md"), "w") as f:
        f.write(markdown(metrics, show, bool(charts), extra))
    with root.fs.open(ctx.output_path("report.html"), "w") as f:
        f.write(html_page(metrics, show, charts, figs, extra))


Extra = tuple[str, str, list[str], list[list[str]]]  # a titled table: title, note, header, rows


def decontamination_section(root: DataRoot, metrics: dict[str, Any]) -> Extra:
    """Documents kept out of each evaluated checkpoint's training because they copy an
    evaluation set, per set, from the train manifests (the decontaminate stage's counts)."""
    names = metrics.get("settings", {}).get("checkpoints", {})
    counts = {role: (m.metrics.get("decontaminated_by_split") if m else None)
              for role, name in names.items() for m in [read_manifest(root, "train", name)]}
    splits = sorted({s for c in counts.values() for s in (c or {})})
    rows = [[s] + [str((c or {}).get(s, 0)) if c is not None else "—" for c in counts.values()]
            for s in splits]
    note = ("Main and retrieved documents that near-duplicate an evaluation image or caption, kept "
            "out of training (`decontaminate` stage; train manifests' decontaminated_by_split)."
            if rows else "No decontamination counts recorded: the decontaminate stage did not run "
            "before these checkpoints were trained.")
    return "Decontamination", note, ["evaluation set", *counts], rows


def sources_section(ctx: ShardContext, show: list[dict[str, Any]]) -> Extra:
    """Where each retrieved document shown in the report came from (storage/provenance.py)."""
    from pipelines.inference.memory import open_memory
    from storage.provenance import SOURCE_HEADER, source_rows

    keys = [k for ex in show for ks in ex.get("documents", {}).values() for k in ks]
    memory = open_memory(ctx.root, getattr(ctx.cfg, "memory", ""), "evaluate.memory")
    rows = source_rows(memory, keys) if keys else []
    return ("Sources of the retrieved documents", "Each document the examples above retrieved: its "
            "URL, caption, when it was fetched and the metadata's licence column ('—': none).",
            SOURCE_HEADER, rows)


MODEL_ORDER = ("ra-cm3", "vanilla", "retrieval-baseline")


def markdown(metrics: dict[str, Any], show: list[dict[str, Any]], charts: bool,
             extra: Sequence[Extra] = ()) -> str:
    header, rows = metric_rows(metrics)
    out = ["# RA-CM3 evaluation", "", md_table(header, rows), ""]
    if (diff := difference_rows(metrics)) is not None:
        out += ["## Paired differences", "", md_table(*diff), ""]
    out += [f"- {line}" for line in facts(metrics)] + [""]
    if (rec := recall_rows(metrics)) is not None:
        out += ["## Retrieval recall (Table 4)", "", md_table(*rec), ""]
    if charts:
        out += ["## Training loss curves", "", "See main.report.html (inline SVG charts).", ""]
    out += ["## Caption → image", "", "Columns: retrieved documents (by the caption), RA-CM3, "
            "vanilla CM3, retrieval baseline, real image.", ""]
    for ex in show:
        out += [f"**{md_escape(ex['caption'])}** — retrieved: {md_escape(ex['retrieved_by_caption'])}", "",
                f"![caption {ex['position']}](main.figures/{ex['t2i']})", ""]
    out += ["## Image → caption", ""]
    for ex in show:
        out += [f"![image {ex['position']}](main.figures/{ex['i2t']})", "",
                f"- references: {' / '.join(md_escape(r) for r in ex['refs'])}",
                f"- retrieved (by the image): {md_escape(ex['retrieved_by_image'])}"]
        out += [f"- {m}: “{md_escape(ex['captions'].get(m, '—'))}”" for m in MODEL_ORDER] + [""]
    for title, note, header, rows in extra:
        out += [f"## {title}", "", md_escape(note), ""]
        out += [md_table(header, [[md_escape(c) for c in r] for r in rows]), ""] if rows else []
    return "\n".join(out)


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:"
         "collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
         "td:first-child{text-align:left}.cap{font-weight:bold}")


def img_tag(data: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}"/>')


def html_page(metrics: dict[str, Any], show: list[dict[str, Any]], charts: list[str],
              figs: dict[str, bytes], extra: Sequence[Extra] = ()) -> str:
    header, rows = metric_rows(metrics)
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>RA-CM3 evaluation</title>",
           f"<style>{STYLE}</style></head><body><h1>RA-CM3 evaluation</h1>",
           html_table(header, rows)]
    if (diff := difference_rows(metrics)) is not None:
        out += ["<h2>Paired differences</h2>", html_table(*diff)]
    out += ["<ul>"] + [f"<li>{html.escape(line)}</li>" for line in facts(metrics)] + ["</ul>"]
    if (rec := recall_rows(metrics)) is not None:
        out += ["<h2>Retrieval recall (Table 4)</h2>", html_table(*rec)]
    if charts:
        out += ["<h2>Training loss curves (main-document NLL)</h2>", "<div>", *charts, "</div>"]
    out += ["<h2>Caption → image</h2><p>Retrieved documents (by the caption), RA-CM3, vanilla "
            "CM3, retrieval baseline, real image.</p>"]
    for ex in show:
        out += [f"<p><span class='cap'>{html.escape(ex['caption'])}</span><br/>retrieved: "
                f"{html.escape(ex['retrieved_by_caption'])}</p>", img_tag(figs[ex["t2i"]], ex["caption"])]
    out += ["<h2>Image → caption</h2>"]
    for ex in show:
        caps = "".join(f"<li>{m}: “{html.escape(ex['captions'].get(m, '—'))}”</li>"
                       for m in MODEL_ORDER)
        out += ["<div>", img_tag(figs[ex["i2t"]], f"image {ex['image_id']}"),
                f"<ul><li>references: {html.escape(' / '.join(ex['refs']))}</li>"
                f"<li>retrieved (by the image): {html.escape(ex['retrieved_by_image'])}"
                f"</li>{caps}</ul></div>"]
    for title, note, header, rows in extra:
        out += [f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>"]
        out += [html_table(header, rows)] if rows else []
    return "\n".join(out + ["</body></html>"])
