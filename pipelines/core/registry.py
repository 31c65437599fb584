"""Registries of stages and config sections, by name, loaded lazily so the CLI starts fast."""

from __future__ import annotations

import importlib
from typing import Any

from pipelines.core.config import ConfigError, build, load_raw

# Pipeline order: a stage's upstream stages come before it.
STAGES: dict[str, str] = {
    "demo": "pipelines.demo.data:DemoDataStage",
    "filter": "pipelines.ingest.filter:FilterStage",
    "download": "pipelines.ingest.download:DownloadStage",
    "fit-clip": "pipelines.demo.fit_clip:FitClipStage",
    "fit-vqgan": "pipelines.demo.fit_vqgan:FitVQGANStage",
    "embed": "pipelines.retrieval.embed:EmbedStage",
    "decontaminate": "pipelines.retrieval.decontaminate:DecontaminateStage",
    "tokenize": "pipelines.tokens.tokenize:TokenizeStage",
    "index": "pipelines.retrieval.index:IndexStage",
    "retrieval-eval": "pipelines.retrieval.recall:RetrievalEvalStage",
    "retrieve": "pipelines.retrieval.retrieve:RetrieveStage",
    "pack": "pipelines.training.pack:PackStage",
    "train": "pipelines.training.train:TrainStage",
    "evaluate-part": "pipelines.evaluation.evaluate:EvaluatePartStage",
    "evaluate": "pipelines.evaluation.evaluate:EvaluateStage",
}

# Stages that run more than once in the end-to-end plan (and get one deployment per run): the
# fields each run replaces in the stage's config section. Every other stage runs once.
RUNS: dict[str, tuple[dict[str, Any], ...]] = {
    "train": ({"variant": "ra-cm3"}, {"variant": "vanilla"}),
}

# Config sections that belong to no stage; every stage's own section comes from its class.
RUN_SECTIONS: dict[str, str] = {
    "run": "pipelines.core.runconfig:RunConfig",
    "beam": "pipelines.core.runconfig:BeamConfig",
}


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def get_stage(name: str) -> Any:
    if name not in STAGES:
        raise ConfigError("stage", f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return _load(STAGES[name])()


def plan() -> list[tuple[str, dict[str, Any]]]:
    """(stage, fields replaced in its config section) for every run, in pipeline order."""
    return [(name, fields) for name in STAGES for fields in RUNS.get(name, ({},))]


def section_of(name: str) -> str:
    """A registered stage's config section (imports its module)."""
    get_stage(name)  # an unknown name is a ConfigError naming the stages
    return _load(STAGES[name]).section


def section_classes() -> dict[str, type]:
    """Every config section name -> its dataclass (imports every stage module)."""
    out = {s: _load(ref) for s, ref in RUN_SECTIONS.items()}
    for ref in STAGES.values():
        cls = _load(ref)
        out[cls.section] = cls.config
    return out


def load_config(preset: str = "demo", file: str | None = None,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """Every config section as a validated dataclass; unknown sections are refused."""
    raw = load_raw(preset, file, overrides)
    sections = section_classes()
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(unknown[0], f"unknown config section; sections: {', '.join(sections)}")
    return inherit({s: build(cls, s, raw.get(s, {})) for s, cls in sections.items()})


def inherit(cfgs: dict[str, Any]) -> dict[str, Any]:
    """Fill each section's unset (None) INHERITS fields from the sections they name."""
    import dataclasses

    out = dict(cfgs)
    for name, cfg in cfgs.items():
        fills = {}
        for field, source in getattr(cfg, "INHERITS", {}).items():
            section, other = source.split(".")
            if getattr(cfg, field) is None and section in cfgs:
                fills[field] = getattr(cfgs[section], other)
        if fills:
            out[name] = dataclasses.replace(cfg, **fills)
    return out


def config_to_dict(cfgs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The built config as plain data (JSON-able): what flows pass to each other."""
    import dataclasses

    return {s: dataclasses.asdict(c) for s, c in cfgs.items()}


def config_from_dict(data: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rebuild (and re-validate) the config from `config_to_dict`'s form."""
    sections = section_classes()
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(unknown[0], f"unknown config section; sections: {', '.join(sections)}")
    return inherit({s: build(cls, s, data.get(s, {})) for s, cls in sections.items()})


def config_of(root: Any, stage_name: str, missing_ok: bool = False) -> Any:
    """The config an upstream stage's shards were made with, rebuilt from its first manifest.

    Lets a stage read how its inputs were produced without importing the stage that made them.
    """
    from storage.manifest import list_manifests

    cls = _load(STAGES[stage_name]).config
    ms = sorted(list_manifests(root, stage_name), key=lambda m: m.shard_id)
    if not ms and missing_ok:
        return cls()
    if not ms:
        raise FileNotFoundError(f"no {stage_name} shards: run `racm3 run {stage_name}` first")
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in ms[0].params.items() if k in fields})
