"""A memory the user can swap: another data root's index, key map and token shards, used by
generate (`--memory`) and evaluate (`evaluate.memory`) only when made with the trained root's
CLIP, VQGAN and BPE; refused naming what differs otherwise."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from flows.cli import main
from pipelines.core.config import ConfigError
from pipelines.core.runconfig import BeamConfig
from pipelines.core.runner import run_stage
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.evaluate import memory_of
from pipelines.evaluation.models import load_models
from pipelines.inference.loader import load_inference
from pipelines.retrieval.embed import EmbedConfig
from pipelines.tokens.tokenizers import checkpoint_path, text_tokenizer_spec
from storage.fs import DataRoot
from tests.factories import make_download_shard
from tests.pipelines.generation.conftest import FIT, TOK
from tests.pipelines.retrieval.retrieval_helpers import CKPT, configs, write_checkpoint

IN_MEMORY = BeamConfig(direct_num_workers=1, direct_running_mode="in_memory")


def build_memory(trained: DataRoot, path: str, own_vqgan: bool = False,
                 own_clip: bool = False) -> DataRoot:
    """A memory root of 8 documents the models never saw (keys 100..107), tokenized and embedded
    with the trained root's VQGAN, BPE and CLIP, or with its own VQGAN / CLIP."""
    mem = DataRoot(path)
    make_download_shard(mem, "00000", n=8, start=100, size=64)
    tok = TOK if own_vqgan else replace(TOK, checkpoint=checkpoint_path(trained, TOK),
                                        text_tokenizer=text_tokenizer_spec(trained, TOK))
    clip = write_checkpoint(mem, seed=1) if own_clip else trained.join(CKPT)
    cfgs = configs(fit_vqgan=FIT, tokenize=tok, embed=EmbedConfig(checkpoint=clip), beam=IN_MEMORY)
    for stage in ("fit-vqgan",) * own_vqgan + ("tokenize", "embed", "index"):
        assert run_stage(stage, mem, cfgs).ok, stage
    return mem


@pytest.fixture(scope="module")
def memory(trained_root, tmp_path_factory) -> DataRoot:
    return build_memory(trained_root, str(tmp_path_factory.mktemp("memory") / "data"))


def test_generation_with_a_swapped_memory_retrieves_only_from_it(trained_root, memory, tmp_path):
    own = set(load_inference(trained_root).memory)
    bench = load_inference(trained_root, memory=memory.path)
    new = set(bench.memory)
    assert len(new) == 8 and not new & own  # the memory's documents, none of the training root's
    assert set(bench.retriever.index.keys) == new and set(bench.captions) == new
    for i, prompt in enumerate(("a photo of the zorvik", "a photo of the quaro", "a photo")):
        out = str(tmp_path / f"g{i}")
        assert main(["generate", "--data-root", trained_root.path, "--caption", prompt,
                     "--samples", "1", "--k", "2", "--memory", memory.path, "--out", out]) == 0
        context = json.load(open(os.path.join(out, "result.json")))["context"]
        assert context and set(context) <= new, context
    # the default memory is still the root's own
    assert set(load_inference(trained_root).retrieve_by_caption("a photo", 2)) <= own


def test_evaluate_memory_loads_the_other_roots_memory(trained_root, memory):
    loaded = load_models(trained_root, EvaluateConfig(memory=memory.path, k=2))
    assert loaded.memory_at.uri == memory.uri
    assert set(loaded.retriever.index.keys) == set(loaded.memory)
    assert memory_of(trained_root, EvaluateConfig(memory=memory.path)).uri == memory.uri
    assert memory_of(trained_root, EvaluateConfig()) is trained_root  # "" = the root itself


@pytest.mark.parametrize("kind", ["encoder", "codebook"])
def test_a_memory_made_with_another_encoder_or_codebook_is_refused(trained_root, tmp_path,
                                                                    capsys, kind):
    other = build_memory(trained_root, str(tmp_path / "other"), own_vqgan=kind == "codebook",
                         own_clip=kind == "encoder")
    with pytest.raises(ConfigError, match=f"made with {kind} "):
        load_inference(trained_root, memory=other.path)
    with pytest.raises(ConfigError, match=f"`evaluate.memory`.*made with {kind} "):
        memory_of(trained_root, EvaluateConfig(memory=other.path))
    capsys.readouterr()
    assert main(["generate", "--data-root", trained_root.path, "--caption", "x", "--memory",
                 other.path, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert f"made with {kind} " in err and "re-run" in err
    assert not os.path.exists(tmp_path / "refused")
