"""Retrieval settings at inference, validated: the retrieve stage's values (what the training
neighbours were selected with) as defaults, explicit overrides (`--set retrieve.*`) winning, and
an expected encoder that differs from the index's refused with the field named."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from pipelines.core.config import ConfigError, build, parse_override
from pipelines.core.registry import config_of
from pipelines.retrieval.encoders import index_encoder
from pipelines.retrieval.search import SearchRule
from storage.fs import DataRoot

SEARCH_FIELDS = tuple(f.name for f in fields(SearchRule))


def inference_rule(root: DataRoot, overrides: Mapping[str, Any] | None = None,
                   encoder: str = "") -> SearchRule:
    """The redundancy rule of retrieval at inference (see the module docstring). `overrides` are
    retrieve-section fields (field -> value) validated as `racm3 run --set retrieve.*` is;
    `encoder` is the embed.model the caller expects ("" = the index's, whatever it is)."""
    if encoder:
        built = index_encoder(root)["model"]
        if encoder != built:
            raise ConfigError("embed.model", f"is {encoder!r} but the index was built with "
                              f"{built!r}: queries would not match the memory; drop the setting "
                              f"or re-run `racm3 run embed` and `racm3 run index`")
    manifest = config_of(root, "retrieve", missing_ok=True)
    cfg = build(type(manifest), "retrieve", {**manifest.params(), **dict(overrides or {})})
    return SearchRule.of(cfg)


def parse_sets(items: list[str]) -> tuple[dict[str, Any], str]:
    """`--set section.field=value` items -> (retrieve-section overrides, embed.model ("" = none));
    another section is refused (only retrieval settings apply at inference)."""
    out: dict[str, Any] = {}
    encoder = ""
    for item in items:
        (section, key), value = parse_override(item)
        if (section, key) == ("embed", "model"):
            encoder = str(value)
        elif section == "retrieve":
            out[key] = value
        else:
            raise ConfigError(f"{section}.{key}", "only retrieve.* and embed.model apply here")
    return out, encoder
