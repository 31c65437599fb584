"""Config values that would break a run later are refused now, naming the field (exit 2 in the CLI)."""

from __future__ import annotations

import pytest

from flows.cli import main
from pipelines.core.config import ConfigError, load_raw
from pipelines.core.registry import load_config
from pipelines.core.runconfig import RunConfig
from pipelines.ingest.download import DownloadConfig
from pipelines.ingest.filter import FilterConfig


@pytest.mark.parametrize("field", ["run.shard_timeout_s", "run.lease_ttl_s", "run.lease_wait_s",
                                   "download.url_timeout_s", "download.shard_deadline_s"])
@pytest.mark.parametrize("value", ["Infinity", "NaN"])
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("demo", None, [f"{field}={value}"])


def test_inf_in_a_toml_file_is_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[run]\nlease_ttl_s = inf\n")
    with pytest.raises(ConfigError, match=r"run\.lease_ttl_s.*finite"):
        load_config("demo", str(f), [])


def test_direct_construction_refuses_inf_too():
    with pytest.raises(ConfigError, match="shard_timeout_s"):
        RunConfig(shard_timeout_s=float("inf"))
    with pytest.raises(ConfigError, match="url_timeout_s"):
        DownloadConfig(url_timeout_s=float("inf"))


def test_config_file_that_is_a_directory_or_not_utf8_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_raw("demo", tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"# caf\xe9\n[run]\nretries = 1\n")
    with pytest.raises(ConfigError, match="latin1.toml.*UTF-8"):
        load_raw("demo", bad)


@pytest.mark.parametrize("kind", ["dir", "latin1"])
def test_cli_exits_2_naming_the_file(kind, tmp_path, capsys):
    path = tmp_path
    if kind == "latin1":
        path = tmp_path / "c.toml"
        path.write_bytes(b"\xff\xfe[run]\n")
    rc = main(["status", "--data-root", str(tmp_path / "root"), "--config", str(path)])
    assert rc == 2
    assert str(path) in capsys.readouterr().err


def test_duckdb_memory_limit_is_judged_by_duckdb():
    assert FilterConfig(duckdb_memory_limit="512MiB").duckdb_memory_limit == "512MiB"
    for bad in ("lots", "", "1 parsec"):
        with pytest.raises(ConfigError, match=r"filter\.duckdb_memory_limit"):
            FilterConfig(duckdb_memory_limit=bad)
