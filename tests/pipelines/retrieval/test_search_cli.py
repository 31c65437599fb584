"""`racm3 search`: the nearest memory documents of a caption or image, and a swapped memory's checks."""

from __future__ import annotations

import numpy as np
import pytest

from flows.cli import main
from pipelines.core.runner import run_stage
from pipelines.retrieval.lookup import load_encoder, read_image
from storage.fs import DataRoot
from storage.shards import read_table
from tests.factories import NAMES, entity_image, make_download_shard
from tests.pipelines.retrieval.retrieval_helpers import configs, write_checkpoint

pytestmark = pytest.mark.slow  # two roots embedded and indexed (~1-2 min on 2 loaded cores)


def built_root(path, seed: int = 0) -> DataRoot:
    """A tiny memory: 8 downloaded docs, embedded and indexed with a racm3-tiny from `seed`."""
    root = DataRoot(str(path))
    write_checkpoint(root, seed)
    make_download_shard(root, "00000", n=8, size=64)
    for stage in ("embed", "index"):
        assert run_stage(stage, root, configs()).ok
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("search")
    return built_root(base / "a"), built_root(base / "b", seed=1)


def test_image_search_returns_the_nearest_document_and_an_escaped_page(roots, tmp_path, capsys):
    root, _ = roots
    query = tmp_path / "query.png"
    entity_image(3, 64, seed=3).save(query)  # doc 3's own rendering
    page = tmp_path / "page.html"
    assert main(["search", "--data-root", root.uri, "--image", str(query), "--k", "3",
                 "--out", str(page)]) == 0
    out = capsys.readouterr().out
    # Expected by brute force over the embed shard's document vectors.
    enc = load_encoder(root)
    q = enc.encode_image([read_image(str(query), enc.image_side)])
    t = read_table(root, root.artifact("embed", "00000", "parquet"), ["key", "doc_emb"])
    docs = np.asarray(t["doc_emb"].to_pylist(), np.float32)
    keys = t["key"].to_pylist()
    expected = [keys[i] for i in np.argsort(-(docs @ q[0]), kind="stable")[:3]]
    ranked = [line.split() for line in out.splitlines()[3:6]]
    assert [r[0] for r in ranked] == ["1", "2", "3"] and [r[2] for r in ranked] == expected
    scores = [float(r[1]) for r in ranked]
    assert scores == sorted(scores, reverse=True)
    top = int(expected[0])
    assert f"a photo of the {NAMES[top % 8]}" in out.splitlines()[3] and len(out.splitlines()) == 3 + 3 + 1
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 4 and "<script" not in html  # 3 docs + query


def test_caption_is_escaped_in_the_page(roots, tmp_path, capsys):
    root, _ = roots
    page = tmp_path / "p.html"
    assert main(["search", "--data-root", root.uri, "--caption", "<b>zorvik</b> & co",
                 "--k", "2", "--out", str(page)]) == 0
    assert "&lt;b&gt;zorvik&lt;/b&gt; &amp; co" in page.read_text()
    assert "<b>zorvik" not in page.read_text()


def test_a_memory_from_another_encoder_is_refused_with_exit_2(roots, capsys):
    root, other = roots
    assert main(["search", "--data-root", root.uri, "--memory", other.uri,
                 "--caption", "a photo of the zorvik", "--out", ""]) == 2
    err = capsys.readouterr().err
    assert f"the memory at {other.uri} was embedded by encoder" in err and "loaded encoder" in err


def test_the_same_encoders_memory_is_accepted(roots, capsys):
    root, _ = roots
    assert main(["search", "--data-root", root.uri, "--memory", root.uri,
                 "--caption", "a photo of the zorvik", "--k", "1", "--out", ""]) == 0
    assert "memory: " + root.uri in capsys.readouterr().out
