"""The models an evaluation compares, loaded through the inference layer with the evaluation's
checkpoints and retrieval settings."""

from __future__ import annotations

from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.judge import judge_clip
from pipelines.inference.loader import Inference, load_inference, set_threads
from pipelines.inference.retrieval import inference_rule
from storage.fs import DataRoot

GENERATORS = ("ra-cm3", "vanilla")  # the two trained models, by role
MODELS = (*GENERATORS, "retrieval-baseline")


def checkpoints(cfg: EvaluateConfig) -> dict[str, str]:
    """role -> checkpoint name under train/."""
    return {"ra-cm3": cfg.ra_checkpoint, "vanilla": cfg.vanilla_checkpoint}


def load_models(root: DataRoot, cfg: EvaluateConfig) -> Inference:
    """Both checkpoints, tokenizers, memory and retriever (loaded now: every checkpoint is
    checked against the index before any shard runs; `cfg.memory`, another root's memory, is
    checked against this root's encoder and tokenizers); retrieval keeps `cfg.k` neighbours under
    the retrieve stage's rule, with the thresholds `cfg` sets winning."""
    set_threads(cfg.threads)
    overrides = {name: getattr(cfg, name) for name in ("query_sim_threshold", "redundancy_threshold")
                 if getattr(cfg, name) is not None}
    rule = inference_rule(root, overrides).keeping(cfg.k)
    loaded = load_inference(root, checkpoints(cfg), cfg.device, rule, memory=cfg.memory)
    assert loaded.retriever is not None  # the index check, before any work
    # the CLIP score's judge: the retrieval CLIP unless evaluate.judge_checkpoint names another
    loaded.shared["judge"] = judge_clip(root, loaded.retriever.encoder, cfg.judge_model,
                                        cfg.judge_checkpoint, cfg.device)
    return loaded
