"""taming-transformers VQGAN family: `<name>.ckpt` (`state_dict`) with `<name>.yaml` beside it.

The yaml's `model.params` (`ddconfig`, `n_embed`, `embed_dim`) gives the architecture, as taming and
Chameleon (`chameleon/inference/image_tokenizer.py`) build it; racm3's own checkpoints embed theirs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import yaml

from model.vq.checks import CheckpointError
from model.vqgan import CONFIG_KEY, VQGANConfig

NAME = "taming"
# `model.target`s whose weights are taming's VectorQuantizer VQGAN (Chameleon's yaml has none).
TARGETS = ("taming.models.vqgan.VQModel", "chameleon.inference.vqgan.VQModel", None)
DDCONFIG = {"resolution", "in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
            "z_channels", "dropout"}


def matches(ckpt: dict[str, Any]) -> bool:
    state = ckpt.get("state_dict", ckpt)
    return isinstance(state, dict) and any(str(k).startswith("encoder.down.") for k in state)


def beside(path: str) -> str | None:
    """`<name>.yaml` next to `<name>.ckpt`, as taming's and Chameleon's releases ship them."""
    cand = os.path.splitext(path)[0] + ".yaml"
    return cand if os.path.exists(cand) else None


def config_from_yaml(path: str) -> VQGANConfig:
    """The architecture in a taming yaml; another family or an unusable field is refused by name."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read the tokenizer yaml {path}: {e}", "vqgan_config") from e
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise CheckpointError(f"{path} has no `model.params`: not a taming-style tokenizer yaml",
                              "vqgan_config")
    target = model.get("target")
    if target not in TARGETS:
        raise CheckpointError(f"{path}: model.target = {target!r} is not a known tokenizer family "
                              f"(known: {', '.join(t for t in TARGETS if t)})", "vqgan_config")
    return _from_params(path, model["params"])


def _from_params(path: str, params: dict[str, Any]) -> VQGANConfig:
    dd = params.get("ddconfig")
    missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in params]
    if missing or not isinstance(dd, dict):
        raise CheckpointError(f"{path} lacks model.params.{(missing or ['ddconfig'])[0]}", "vqgan_config")
    if dd.get("double_z"):
        raise CheckpointError(f"{path}: model.params.ddconfig.double_z = true is a KL autoencoder, "
                              "not a VQ tokenizer", "vqgan_config")
    if dd.get("out_ch", dd.get("in_channels", 3)) != dd.get("in_channels", 3):
        raise CheckpointError(f"{path}: model.params.ddconfig.out_ch must equal in_channels", "vqgan_config")
    kwargs = {k: dd[k] for k in DDCONFIG if k in dd}
    return VQGANConfig.from_dict(kwargs | {"n_embed": params["n_embed"], "embed_dim": params["embed_dim"],
                                           "norm_groups": 32})  # taming hard-codes GroupNorm(32)


def read(ckpt: dict[str, Any], path: str, config_path: str | None, fallback: VQGANConfig | None,
         resolution: int = 256) -> tuple[VQGANConfig, dict[str, torch.Tensor], str]:
    """(architecture, state dict in racm3's layout, where the architecture came from).

    `resolution` is unused: a taming model's resolution is in its config."""
    state = ckpt.get("state_dict", ckpt)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # GAN/LPIPS parts
    yaml_path = config_path or beside(path)
    if yaml_path:
        return config_from_yaml(yaml_path), state, yaml_path
    if CONFIG_KEY in ckpt:
        return VQGANConfig.from_dict(ckpt[CONFIG_KEY]), state, "checkpoint"
    if fallback is None:
        raise CheckpointError(f"{path} does not say its architecture: put its .yaml beside it, set "
                              "tokenize.vqgan_config, or name a preset in tokenize.arch", "vqgan_config")
    return fallback, state, "preset"
