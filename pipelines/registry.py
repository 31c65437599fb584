"""Registries of stages and config sections, by name, loaded lazily so the CLI starts fast."""

from __future__ import annotations

import importlib
from typing import Any

from pipelines.config import ConfigError, build, load_raw

# Pipeline order: a stage's upstream stages come before it.
STAGES: dict[str, str] = {
    "demo": "pipelines.demo_data:DemoDataStage",
    "filter": "pipelines.filter:FilterStage",
    "download": "pipelines.download:DownloadStage",
    "fit-clip": "pipelines.fit_clip:FitClipStage",
    "fit-vqgan": "pipelines.fit_vqgan:FitVQGANStage",
    "embed": "pipelines.embed:EmbedStage",
    "tokenize": "pipelines.tokenize:TokenizeStage",
    "index": "pipelines.index:IndexStage",
    "retrieval-eval": "pipelines.retrieval_eval:RetrievalEvalStage",
    "retrieve": "pipelines.retrieve:RetrieveStage",
    "train": "pipelines.train:TrainStage",
    "evaluate": "pipelines.evaluate:EvaluateStage",
}

# Config sections: section name -> dataclass.
SECTIONS: dict[str, str] = {
    "run": "pipelines.runconfig:RunConfig",
    "beam": "pipelines.runconfig:BeamConfig",
    "demo": "pipelines.demo_data:DemoDataConfig",
    "filter": "pipelines.filter:FilterConfig",
    "download": "pipelines.download:DownloadConfig",
    "fit_clip": "pipelines.fit_clip:FitClipConfig",
    "fit_vqgan": "pipelines.fit_vqgan:FitVQGANConfig",
    "embed": "pipelines.embed:EmbedConfig",
    "tokenize": "pipelines.tokenize:TokenizeConfig",
    "index": "pipelines.index:IndexConfig",
    "retrieval_eval": "pipelines.retrieval_eval:RetrievalEvalConfig",
    "retrieve": "pipelines.retrieve:RetrieveConfig",
    "train": "pipelines.train:TrainConfig",
    "evaluate": "pipelines.evaluate:EvaluateConfig",
}


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def get_stage(name: str) -> Any:
    if name not in STAGES:
        raise ConfigError("stage", f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return _load(STAGES[name])()


def load_config(preset: str = "demo", file: str | None = None,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """Every config section as a validated dataclass; unknown sections are refused."""
    raw = load_raw(preset, file, overrides)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown config section; sections: {', '.join(SECTIONS)}")
    return {s: build(_load(ref), s, raw.get(s, {})) for s, ref in SECTIONS.items()}
