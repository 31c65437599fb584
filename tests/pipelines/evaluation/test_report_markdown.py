"""report.md shows web captions as literal text: Markdown and HTML in a caption neither format,
link nor embed anything (issue 22)."""

from __future__ import annotations

import re

from pipelines.evaluation.report import markdown, md_escape

HOSTILE = "**bold** [click](http://evil.example/x) ![img](http://evil.example/p.png) <script>x</script> _em_ `code`\n# heading | cell"


def metrics() -> dict:
    return {"models": {"ra-cm3": {"image ppl": 2.0}}, "intervals": {}, "differences": {},
            "split": {"usable_images": 1, "images_listed": 1, "annotations": 5},
            "leakage_guard": {"excluded_memory_docs": 0, "image_near_duplicates": 0,
                              "image_threshold": 0.98, "text_near_duplicates": 0,
                              "text_threshold": 0.98},
            "settings": {"images": 1, "k": 2, "image_samples": 2, "caption_samples": 2},
            "fid_features": "FID-EffNetLite0"}


def shown() -> dict:
    return {"position": 0, "caption": HOSTILE, "refs": [HOSTILE, "a plain reference"],
            "captions": {"ra-cm3": HOSTILE, "vanilla": "a dog", "retrieval-baseline": HOSTILE},
            "retrieved_by_caption": f"“{HOSTILE}”", "retrieved_by_image": f"“{HOSTILE}”",
            "t2i": "t2i_0.png", "i2t": "i2t_0.png"}


def unescaped(md: str, pattern: str) -> list[str]:
    """Matches of `pattern` whose first character is not backslash-escaped."""
    return [m.group(0) for m in re.finditer(pattern, md) if md[m.start() - 1] != "\\"]


def test_web_captions_in_report_md_cannot_link_embed_or_format():
    md = markdown(metrics(), [shown()], charts=False)
    assert not unescaped(md, r"!?\[(click|img)\]\(http")  # no link, no remote image
    assert not unescaped(md, r"<script>")  # no raw HTML
    assert not unescaped(md, r"\*\*bold")  # no bold from the caption
    assert "\n# heading" not in md and "\n\\# heading" not in md  # no heading from a line break
    # the report's own images and structure still render
    assert "![caption 0](main.figures/t2i_0.png)" in md and "## Image → caption" in md
    assert md.count("click") == 6  # every place the caption is shown still shows it


def test_md_escape_keeps_the_text():
    assert md_escape("a_b *c* [d](e)") == r"a\_b \*c\* \[d\]\(e\)"
    assert re.sub(r"\\(.)", r"\1", md_escape(HOSTILE)) == " ".join(HOSTILE.split())
