"""Config loading: presets, overrides, and errors that name the field."""

from __future__ import annotations

import pytest

from pipelines.core.config import ConfigError
from pipelines.core.registry import config_from_dict, config_to_dict, load_config


def test_presets_load_and_validate():
    for preset in ("demo", "paper"):
        cfgs = load_config(preset)
        assert cfgs["filter"].max_pwatermark == 0.5 and cfgs["download"].image_size == 256


def test_override_parses_json_values():
    cfgs = load_config("demo", overrides=["filter.max_punsafe=0.3", "filter.url_col=url"])
    assert cfgs["filter"].max_punsafe == 0.3 and cfgs["filter"].url_col == "url"


@pytest.mark.parametrize("override, field", [
    ("filter.max_pwatermark=2", "filter.max_pwatermark"),
    ("filter.shard_size=abc", "filter.shard_size"),
    ("filter.nope=1", "filter.nope"),
    ("nosection.x=1", "nosection"),
    ("download.resize_mode=stretch", "download.resize_mode"),
    ("filterthreshold", "filterthreshold"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("demo", overrides=[override])
    assert e.value.field == field and field in str(e.value)


def test_config_file_merges_over_preset(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text("[filter]\nmin_width = 128\n")
    cfgs = load_config("demo", str(f))
    assert cfgs["filter"].min_width == 128 and cfgs["filter"].min_height == 256


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("demo", str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[filter\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("demo", str(bad))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_execution_fields_stay_out_of_the_fingerprint():
    a = load_config("demo", overrides=["download.threads=4"])["download"].params()
    b = load_config("demo", overrides=["download.threads=64"])["download"].params()
    assert a == b and "threads" not in a


def test_evaluate_takes_the_retrieve_thresholds_unless_it_sets_its_own():
    """One setting, one place: `--set retrieve.redundancy_threshold=...` reaches evaluate (whose
    retrieval then changes: tests/pipelines/evaluation/test_evaluate.py), evaluate's own wins."""
    cfgs = load_config("demo", overrides=["retrieve.redundancy_threshold=0.5",
                                          "retrieve.query_sim_threshold=0.7"])
    assert (cfgs["evaluate"].redundancy_threshold, cfgs["evaluate"].query_sim_threshold) == (0.5, 0.7)
    own = load_config("demo", overrides=["retrieve.redundancy_threshold=0.5",
                                         "evaluate.redundancy_threshold=0.8"])
    assert own["evaluate"].redundancy_threshold == 0.8
    again = config_from_dict(config_to_dict(cfgs))  # what flows pass between processes
    assert again["evaluate"].redundancy_threshold == 0.5
