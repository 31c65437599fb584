"""The tokenizer families by name, and one loader that picks a checkpoint's family and checks it."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch

from model.vq import llamagen, taming
from model.vq.checks import CheckpointError, Expect, read_torch, refuse_mismatch
from model.vqgan import VQGAN, VQGANConfig

log = logging.getLogger(__name__)

# Each family has NAME, matches(ckpt) -> bool and read(ckpt, path, config_path, fallback, ...).
FAMILIES: dict[str, ModuleType] = {m.NAME: m for m in (taming, llamagen)}


def family_of(ckpt: dict[str, Any], path: str) -> ModuleType:
    for fam in FAMILIES.values():
        if fam.matches(ckpt):
            return fam
    raise CheckpointError(f"{path} is no known tokenizer family; racm3 reads "
                          f"{', '.join(FAMILIES)} VQ checkpoints")


def tensor_shape(state: dict[str, torch.Tensor], path: str) -> dict[str, int]:
    """Codebook size and factor as the tensors say (racm3 layout); each decoder level shows in its keys."""
    if "quantize.embedding.weight" not in state:
        kind = "a Gumbel quantizer" if "quantize.embed.weight" in state else "not a VectorQuantizer VQ"
        raise CheckpointError(f"{path} has no `quantize.embedding.weight` ({kind}); racm3 reads "
                              "taming's VectorQuantizer and LlamaGen's VQ")
    levels = {int(k.split(".")[2]) for k in state if k.startswith(("decoder.up.", "encoder.down."))}
    return {"n_embed": state["quantize.embedding.weight"].shape[0], "factor": 2 ** max(levels, default=0)}


def agree(path: str, source: str, cfg: VQGANConfig, have: dict[str, int]) -> None:
    """The architecture's own config must describe the tensors (else the yaml belongs elsewhere)."""
    for what, key, cfg_value, yaml_field in (
            ("codebook size", "n_embed", cfg.n_embed, "model.params.n_embed"),
            ("downsampling factor", "factor", cfg.factor, "model.params.ddconfig.ch_mult")):
        if have[key] != cfg_value:
            where, fix = WHERE.get(source, (yaml_field, "vqgan_config"))
            raise CheckpointError(f"{path} has {what} {have[key]} in its tensors but {source} says "
                                  f"{cfg_value} ({where}); the config and the weights disagree", fix)


# Where an architecture came from other than a yaml: (what to name, the config field to fix).
WHERE = {"preset": ("tokenize.arch", "arch"), "checkpoint": ("its embedded config", "checkpoint"),
         "tensors": ("its tensors", "checkpoint")}


def build(path: str, source: str, cfg: VQGANConfig, state: dict[str, torch.Tensor]) -> VQGAN:
    model = VQGAN(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a size mismatch: name the first tensor and the config
        first = str(e).split("size mismatch for ")[-1].split(":")[0]
        raise CheckpointError(f"{path}: tensor {first} does not fit the architecture from {source}",
                              "vqgan_config") from e
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the architecture from {source}: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}", "vqgan_config")
    return model.eval()


def load(path: str, config_path: str | None = None, fallback: VQGANConfig | None = None,
         expect: Expect = Expect(), allow_pickle: bool = False) -> VQGAN:
    """A tokenizer checkpoint of any family; codebook size, factor and resolution checked.

    The architecture comes from the checkpoint's own config (a yaml, embedded, or its tensors);
    `fallback` (a preset) only when it has none, and then its resolution is not checked.
    """
    ckpt = read_torch(path, allow_pickle)
    fam = family_of(ckpt, path)
    cfg, state, source = fam.read(ckpt, path, config_path, fallback, expect.resolution or 256)
    have = tensor_shape(state, path)
    agree(path, source, cfg, have)
    refuse_mismatch(path, have | ({} if source == "preset" else {"resolution": cfg.resolution}), expect)
    log.info("tokenizer %s: %s family, architecture from %s", path, fam.NAME, source)
    return build(path, source, cfg, state)
