"""A removal carried through every stage: no trace in any shard, index search or neighbour list;
checkpoints trained before it are flagged until training runs again."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch

from flows.cli import main
from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from pipelines.training.train import TrainConfig
from storage.manifest import list_manifests
from storage.removal_audit import leftovers, made_before_removal
from tests.pipelines.generation.conftest import FIT, TOK, TRAIN
from tests.pipelines.retrieval.retrieval_helpers import configs, write_checkpoint

DATA = ("filter", "download")
MODEL = ("fit-vqgan", "tokenize", "embed", "index", "retrieve", "pack", "train")


def run_all(root, cfgs, stages) -> None:
    for s in stages:
        assert run_stage(s, root, cfgs).ok, s


def keys_in(root, stage: str, column: str = "key") -> set[str]:
    out: set[str] = set()
    for m in list_manifests(root, stage):
        for p in m.outputs:
            if p.endswith(".parquet"):
                t = pq.read_table(root.join(p))
                if column in t.column_names:
                    for v in t[column].to_pylist():
                        out.update(v if isinstance(v, list) else [v])
    return out


def test_removal_reaches_index_neighbours_and_flags_checkpoints(served, tmp_path):
    root, _, overrides = served
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfgs = {**load_config("demo", overrides=overrides),
            **configs(fit_vqgan=FIT, tokenize=TOK, train=TrainConfig(variant="ra-cm3", **TRAIN))}
    write_checkpoint(root)
    run_all(root, cfgs, DATA + MODEL)
    neighbours = keys_in(root, "retrieve", "neighbor_keys")
    victim = sorted(neighbours)[0]  # a document that is somebody's neighbour
    (tmp_path / "k.txt").write_text(victim + "\n")
    assert main(["remove", "--data-root", root.path, "--keys", str(tmp_path / "k.txt"),
                 *sum((["--set", o] for o in overrides), [])]) == 0
    assert "train" in made_before_removal(root)  # the checkpoint used it: flagged
    assert {x.stage for x in leftovers(root)} >= {"embed", "retrieve"}

    run_all(root, cfgs, MODEL)
    for stage, col in (("download", "key"), ("embed", "key"), ("tokenize", "key"),
                       ("retrieve", "key"), ("retrieve", "neighbor_keys")):
        assert victim not in keys_in(root, stage, col), (stage, col)
    assert leftovers(root) == []
    assert made_before_removal(root) == {}  # retrained: no longer flagged
    from pipelines.retrieval.faiss_index import load_index
    index = load_index(root)
    assert victim not in set(index.keys)
    torch.set_num_threads(before)
