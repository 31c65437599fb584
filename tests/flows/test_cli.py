"""The racm3 CLI end to end on the tiny demo: run, status, inspect, lineage, bad input."""

from __future__ import annotations

import json

import pytest

from flows.cli import main


def cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def downloaded(served, capsys):
    root, _, overrides = served
    sets = [a for o in overrides for a in ("--set", o)]
    for stage in ("filter", "download"):
        code, _, err = cli(capsys, "run", stage, "--local", "--data-root", root.uri, *sets)
        assert code == 0, err
    return root, sets


def test_run_inspect_status_lineage(downloaded, capsys):
    root, sets = downloaded
    code, out, _ = cli(capsys, "inspect", "--data-root", root.uri, "--format", "json",
                       "select status, count(*) as n from download group by 1 order by 1")
    rows = json.loads(out)
    assert code == 0 and {r["status"] for r in rows} >= {"success", "failed_to_download"}
    code, out, _ = cli(capsys, "inspect", "--data-root", root.uri, "--format", "csv",
                       "select stage, count(*) as shards from manifests group by 1 order by 1")
    assert code == 0 and out.splitlines()[0] == "stage,shards" and "download," in out
    code, out, _ = cli(capsys, "inspect", "--data-root", root.uri)
    assert "download" in out and "manifests" in out
    code, out, _ = cli(capsys, "status", "--data-root", root.uri, *sets)
    line = next(x for x in out.splitlines() if x.strip("│ ").startswith("download"))
    cells = [c.strip() for c in line.split("│") if c.strip()]
    assert cells[0] == "download" and cells[1] == cells[2] and cells[3:5] == ["0", "0"]
    code, out, _ = cli(capsys, "lineage", "--data-root", root.uri, "download/000-00000.parquet")
    assert code == 0 and "filter/000-00000" in out and "demo/laion.parquet" in out
    assert "row_start=0" in out


def test_second_run_skips_everything(downloaded, capsys):
    root, sets = downloaded
    code, out, _ = cli(capsys, "run", "download", "--local", "--data-root", root.uri, *sets)
    line = next(x for x in out.splitlines() if "download" in x and "│" in x)
    cells = [c.strip() for c in line.split("│") if c.strip()]
    assert code == 0 and cells[1] == "0" and int(cells[2]) > 0


def test_bad_config_names_the_field(capsys, tmp_path):
    code, _, err = cli(capsys, "run", "filter", "--local", "--data-root", str(tmp_path),
                       "--set", "filter.max_punsafe=7")
    assert code == 2 and "filter.max_punsafe" in err


def test_unknown_stage_and_bad_sql(capsys, tmp_path):
    code, _, err = cli(capsys, "run", "nosuch", "--local", "--data-root", str(tmp_path))
    assert code == 2 and "unknown stage" in err
    code, _, err = cli(capsys, "inspect", "--data-root", str(tmp_path), "select * from nope")
    assert code == 2 and "views:" in err


def test_lineage_of_unknown_path(capsys, tmp_path):
    code, _, err = cli(capsys, "lineage", "--data-root", str(tmp_path), "download/x.parquet")
    assert code == 2 and "no manifest" in err


def test_missing_upstream_says_what_to_run(capsys, tmp_path):
    code, _, err = cli(capsys, "run", "filter", "--local", "--data-root", str(tmp_path))
    assert code == 2 and "racm3 run demo" in err
