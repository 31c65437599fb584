"""A small self-contained HTML page: each prompt, its in-context documents, the outputs, and
where each memory document came from (URL, caption, fetch time, licence)."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

from PIL import Image

SCALE = 4  # demo images are 32 px: show them 4x, without smoothing


@dataclass
class Figure:
    """One image or caption with a label under it."""

    label: str
    image: Image.Image | None = None
    text: str = ""


@dataclass
class Section:
    title: str
    prompt: list[Figure] = field(default_factory=list)
    context: list[Figure] = field(default_factory=list)
    outputs: list[Figure] = field(default_factory=list)


def data_uri(image: Image.Image, scale: int = SCALE) -> str:
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_html(f: Figure) -> str:
    img = f'<img src="{data_uri(f.image)}" alt="{html.escape(f.label)}">' if f.image else ""
    text = f"<div class=t>{html.escape(f.text)}</div>" if f.text else ""
    return f"<figure>{img}{text}<figcaption>{html.escape(f.label)}</figcaption></figure>"


def row(name: str, figures: list[Figure]) -> str:
    if not figures:
        return f"<div class=row><h3>{name}</h3><p class=none>none</p></div>"
    return f"<div class=row><h3>{name}</h3>{''.join(map(figure_html, figures))}</div>"


CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1100px}
figure{display:inline-block;margin:4px;vertical-align:top;width:140px}
figure img{image-rendering:pixelated;width:128px;height:128px;border:1px solid #ccc}
figcaption,.t{font-size:12px;word-wrap:break-word}.t{font-weight:bold}
.row{margin:.3em 0 .8em}h3{font-size:14px;margin:.2em 0}.none{color:#888;font-size:12px}
section{border-top:1px solid #ddd;padding-top:.5em}
table.src{border-collapse:collapse;font-size:12px}.src td,.src th{border:1px solid #ccc;padding:2px 6px}"""


def sources_html(header: list[str], rows: list[list[str]]) -> str:
    """The memory documents' origins as a table (every cell escaped: web text stays text)."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return (f"<section><h2>Sources of the memory documents</h2>"
            f"<table class=src><tr>{head}</tr>{body}</table></section>")


def render(title: str, sections: list[Section], notes: str = "",
           sources: tuple[list[str], list[list[str]]] = ([], [])) -> str:
    body = "".join(f"<section><h2>{html.escape(s.title)}</h2>{row('prompt', s.prompt)}"
                   f"{row('in-context documents', s.context)}{row('outputs (best first)', s.outputs)}"
                   f"</section>" for s in sections)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(notes)}</p>{body}{sources_html(*sources)}</body></html>")
