"""Registries of stages and config sections, by name, loaded lazily so the CLI starts fast."""

from __future__ import annotations

import importlib
from typing import Any

from pipelines.config import ConfigError, build, load_raw

# Pipeline order: a stage's upstream stages come before it.
STAGES: dict[str, str] = {
    "filter": "pipelines.filter:FilterStage",
    "download": "pipelines.download:DownloadStage",
    "fit-vqgan": "pipelines.fit_vqgan:FitVQGANStage",
    "tokenize": "pipelines.tokenize:TokenizeStage",
    "train": "pipelines.train:TrainStage",
}

# Config sections: section name -> dataclass.
SECTIONS: dict[str, str] = {
    "run": "pipelines.runconfig:RunConfig",
    "beam": "pipelines.runconfig:BeamConfig",
    "demo": "pipelines.demo_data:DemoDataConfig",
    "filter": "pipelines.filter:FilterConfig",
    "download": "pipelines.download:DownloadConfig",
    "fit_vqgan": "pipelines.fit_vqgan:FitVQGANConfig",
    "tokenize": "pipelines.tokenize:TokenizeConfig",
    "train": "pipelines.train:TrainConfig",
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
