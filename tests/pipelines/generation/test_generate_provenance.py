"""Generated pages and samples carry their sources: result.json / showcase.json name the memory
documents used, the pages list their origins, and `racm3 lineage` / `racm3 status` go from a
generated sample to those documents and flag it once one of them is removed."""

from __future__ import annotations

import json
import os
import shutil

from flows.cli import main
from storage.fs import DataRoot
from storage.provenance import used_outputs
from storage.removals import append, entries


def test_generated_sample_traces_to_its_documents_and_is_flagged_after_a_removal(
        trained_root, entity_split, tmp_path, capsys):
    root = DataRoot(str(tmp_path / "data"))
    shutil.copytree(trained_root.path, root.path)  # removals below must not touch the shared root
    out = str(tmp_path / "t2i")
    assert main(["generate", "--data-root", root.path, "--caption", "a photo of the thing",
                 "--samples", "1", "--k", "2", "--out", out]) == 0
    rec = json.load(open(os.path.join(out, "result.json")))
    assert rec["documents"] == rec["context"] and rec["documents"]  # retrieved memory keys
    assert [s["key"] for s in rec["sources"]] == rec["documents"]
    page = open(os.path.join(out, "index.html")).read()
    assert "Sources of the memory documents" in page
    assert all(f"<td>{k}</td>" in page for k in rec["documents"])
    logged = {d["path"]: d["keys"] for d in used_outputs(root)}
    assert logged[os.path.abspath(os.path.join(out, "index.html"))] == sorted(rec["documents"])

    capsys.readouterr()
    sample = os.path.join(out, "sample_0.png")
    assert main(["lineage", "--data-root", root.path, sample]) == 0
    text = capsys.readouterr().out
    assert f"made from {len(rec['documents'])} memory document(s)" in text and "FLAGGED" not in text
    victim = rec["documents"][0]
    append(root, entries("key", [victim], "test", "flag check"))
    assert main(["lineage", "--data-root", root.path, sample]) == 0
    assert f"FLAGGED: {victim} has been removed" in capsys.readouterr().out
    assert main(["status", "--data-root", root.path]) == 0
    page_path = os.path.abspath(os.path.join(out, "index.html"))
    assert f"generate:{page_path} used 1 removed document(s)" in capsys.readouterr().out

    show = str(tmp_path / "show")
    assert main(["showcase", "--data-root", root.path, "--coco", entity_split, "--images", "2",
                 "--samples", "1", "--weights", "0", "--out", show]) == 0
    res = json.load(open(os.path.join(show, "showcase.json")))
    assert res["documents"] and [s["key"] for s in res["sources"]] == res["documents"]
    assert "Sources of the memory documents" in open(os.path.join(show, "sources.html")).read()
    assert main(["lineage", "--data-root", root.path, os.path.join(show, "infill.png")]) == 0
    assert f"made from {len(res['documents'])} memory document(s)" in capsys.readouterr().out
