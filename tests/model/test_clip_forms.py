"""Every form open_clip weights ship in loads offline through DocEncoder (embed.model /
embed.checkpoint): a hub folder (.bin or .safetensors), a .safetensors file, a state-dict file and
OpenAI's TorchScript archive; embeddings equal the saved model's own on the same inputs."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from model.clip_encoder import DocEncoder, checkpoint_form, create_clip
from tests.factories import entity_image

NAME = "racm3-test-openai"
# OpenAI's shape rules (64-wide heads, QuickGELU), small: build_model_from_openai_state_dict
# rebuilds exactly this from a TorchScript archive's tensors.
CONFIG = {"embed_dim": 32, "quick_gelu": True,
          "vision_cfg": {"image_size": 32, "layers": 1, "width": 128, "patch_size": 16},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1}}
CAPTIONS = ["a photo of the zorvik", "the quaro on a table"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random open_clip model, its own eval transform and tokenizer, and its embeddings."""
    cfg_dir = tmp_path_factory.mktemp("cfg")
    (cfg_dir / f"{NAME}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(NAME)
    model.eval()
    with torch.no_grad():  # OpenAI's archives hold fp16 weights: make these exact in fp16 too
        for t in model.state_dict().values():
            t.copy_(t.half().float())
    images = [entity_image(e, 48, seed=e) for e in range(3)]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer(NAME)(CAPTIONS), normalize=True)
    return model, images, img.numpy(), txt.numpy()


def write_form(form: str, model, tmp_path) -> str:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if form.startswith("hub-folder"):
        folder = tmp_path / "hub"
        folder.mkdir()
        cfg = {"model_cfg": CONFIG, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                       "std": list(open_clip.OPENAI_DATASET_STD)}}
        (folder / "open_clip_config.json").write_text(json.dumps(cfg))
        if form.endswith("safetensors"):
            save_file(state, str(folder / "open_clip_model.safetensors"))
        else:
            torch.save(state, folder / "open_clip_pytorch_model.bin")
        return str(folder)
    path = tmp_path / {"safetensors": "clip.safetensors", "state-dict": "clip.pt"}.get(form, "ViT-tiny.pt")
    if form == "safetensors":
        save_file(state, str(path))
    elif form == "state-dict":
        torch.save(state, path)
    else:  # OpenAI ships a TorchScript archive: script the same model, as open_clip's jit=True does
        torch.jit.save(torch.jit.script(model), str(path))
    return str(path)


@pytest.mark.parametrize("form", ["hub-folder-bin", "hub-folder-safetensors", "safetensors",
                                  "state-dict", "torchscript"])
def test_every_form_gives_the_models_own_embeddings(reference, tmp_path, form):
    model, images, want_img, want_txt = reference
    ckpt = write_form(form, model, tmp_path)
    assert checkpoint_form(ckpt) == form.removesuffix("-bin").removesuffix("-safetensors")
    enc = DocEncoder.load(NAME, ckpt, f"{NAME}@test", batch_size=2)
    np.testing.assert_allclose(enc.encode_image(images), want_img, atol=1e-5)
    np.testing.assert_allclose(enc.encode_text(CAPTIONS), want_txt, atol=1e-5)


def test_truncated_safetensors_names_the_file(reference, tmp_path):
    model, *_ = reference
    path = write_form("safetensors", model, tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"clip\.safetensors is not a readable safetensors file"):
        create_clip(NAME, path)


def test_hub_folder_without_weights_and_other_width_are_refused(reference, tmp_path):
    model, *_ = reference
    folder = write_form("hub-folder-bin", model, tmp_path)
    with pytest.raises(ValueError, match="embedding width 32 but model config 'racm3-tiny'"):
        create_clip("racm3-tiny", folder)
    (tmp_path / "hub" / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="needs open_clip_config.json and one of"):
        create_clip(NAME, folder)


def test_hub_folder_fingerprint_follows_its_weights(reference, tmp_path):
    """The encoder fingerprint (recorded in embed/index manifests) hashes the folder's files."""
    from model.clip_encoder import encoder_fingerprint
    from pipelines.retrieval.encoders import checkpoint_ref
    from storage.fs import DataRoot

    model, *_ = reference
    root = DataRoot(str(tmp_path))
    folder = write_form("hub-folder-bin", model, tmp_path)
    before = encoder_fingerprint(NAME, checkpoint_ref(root, folder).digest)
    assert before.startswith(f"{NAME}@") and before == encoder_fingerprint(NAME, checkpoint_ref(root, folder).digest)
    state = model.state_dict()
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, tmp_path / "hub" / "open_clip_pytorch_model.bin")
    assert encoder_fingerprint(NAME, checkpoint_ref(root, folder).digest) != before
