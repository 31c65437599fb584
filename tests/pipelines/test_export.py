"""`racm3 export`: safetensors + config.json that the doc's plain-PyTorch snippet loads with racm3's
logits; damaged input exits 2 and writes nothing."""

import json
import re
from pathlib import Path

import pytest
import torch

from flows.cli import main
from model.document import Vocab
from model.transformer import Transformer, TransformerConfig
from pipelines.export import ExportError, load_export
from pipelines.training.checkpoints import save_model
from storage.fs import DataRoot

DOC = Path(__file__).parents[2] / "docs" / "bring-your-own.md"
VOCAB = Vocab(n_text=40, n_image=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[DataRoot, Transformer]:
    root = DataRoot(str(tmp_path_factory.mktemp("export")))
    root.fs.makedirs(root.resolve("train"), exist_ok=True)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=VOCAB.size, n_layer=2, n_head=2, d_model=32,
                                          max_seq_len=64)).eval()
    lineage = {"codebook": "c0ffee", "text_tokenizer": "bpe123", "n_text": 40, "n_image": 16}
    save_model(root, root.artifact("train", "ra-cm3", "pt"), model, VOCAB, lineage, {"lr": 1e-3})
    return root, model


def doc_snippet() -> dict:
    """Run the doc's plain-PyTorch block (the one defining `logits`) and return its names."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    code = next(b for b in blocks if "def logits(" in b)
    assert len(code.strip().splitlines()) <= 30  # it stays a short snippet
    names: dict = {}
    exec(compile(code, str(DOC), "exec"), names)
    return names


def test_export_loads_in_plain_pytorch(trained, tmp_path):
    root, model = trained
    out = tmp_path / "exported"
    assert main(["export", "--data-root", root.uri, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"]["n_layer"] == 2 and cfg["vocabulary"]["image_offset"] == VOCAB.image_offset
    assert cfg["vocabulary"]["fingerprint"] == VOCAB.fingerprint()
    assert cfg["tokenizers"] == {"codebook": "c0ffee", "text_tokenizer": "bpe123"}
    snippet = doc_snippet()
    config, w = snippet["load_racm3"](str(out))
    ids = torch.randint(0, VOCAB.size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, _ = model(ids, torch.arange(11).expand(2, 11))
    got = snippet["logits"](config, w, ids)
    assert got.shape == (2, 11, VOCAB.size)
    assert torch.allclose(got, want, atol=1e-5)
    again, vocab, _ = load_export(str(out))
    assert vocab == VOCAB and torch.allclose(again(ids, torch.arange(11).expand(2, 11))[0], want, atol=1e-6)


def test_truncated_safetensors_is_named(trained, tmp_path):
    root, _ = trained
    out = tmp_path / "exported"
    assert main(["export", "--data-root", root.uri, "--out", str(out)]) == 0
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"model\.safetensors is missing or damaged"):
        load_export(str(out))


def test_bad_checkpoint_or_out_exits_2_and_writes_nothing(trained, tmp_path, capsys):
    root, _ = trained
    bad = root.artifact("train", "broken", "pt")
    with root.fs.open(bad, "wb") as f:
        f.write(b"PK\x03\x04 not a torch file")
    out = tmp_path / "exported"
    assert main(["export", "--data-root", root.uri, "--variant", "broken", "--out", str(out)]) == 2
    assert "train/broken.pt cannot be exported" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".export-*"))
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--data-root", root.uri, "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]
