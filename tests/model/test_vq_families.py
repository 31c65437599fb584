"""Tokenizer families against their own libraries: taming's modules (random weights, its ckpt + yaml
layout, including Chameleon's 512² f16 8,192-code shape) and LlamaGen's key layout; bad input refused."""

import pytest
import torch
import torch.nn.functional as F

from model.vq.checks import CheckpointError, Expect
from model.vq.llamagen import rename
from model.vq.registry import load
from pipelines.tokens.tokenize import TokenizeConfig, encode_images
from pipelines.tokens.tokenizers import load_vqgan
from tests.model.vq_taming import ddconfig, random_taming, save_taming

# taming's ImageNet f16 shape (ch_mult [1,1,2,2,4], attention on the 16x16 grid), scaled to 64 px.
IMAGENET_LIKE = ddconfig(64, [1, 1, 2, 2, 4], [4])


def images(n: int, side: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    m = random_taming(IMAGENET_LIKE, 64, 8)
    return m, save_taming(m, IMAGENET_LIKE, 64, 8, tmp_path_factory.mktemp("taming") / "vq.ckpt")


def test_taming_yaml_architecture_gives_the_library_codes(imagenet_like):
    """The yaml beside the .ckpt is the architecture (the `demo` preset fallback is not used)."""
    ref, path = imagenet_like
    ours = load(str(path), expect=Expect(n_embed=64, factor=16, resolution=64))
    assert ours.cfg.ch_mult == (1, 1, 2, 2, 4) and ours.cfg.attn_resolutions == (4,)
    x = images(3, 64)
    codes = ours.encode(x)
    assert codes.shape == (3, 4, 4) and len(codes.unique()) > 3
    assert torch.equal(codes, ref.codes(x))
    assert torch.allclose(ours.decode(codes), ref.decode(codes).clamp(-1, 1), atol=1e-4)


def test_explicit_vqgan_config_path(imagenet_like, tmp_path):
    ref, path = imagenet_like
    moved = tmp_path / "elsewhere.ckpt"
    moved.write_bytes(path.read_bytes())  # no yaml beside it now
    with pytest.raises(CheckpointError, match="does not say its architecture") as e:
        load(str(moved))
    assert e.value.field == "vqgan_config"
    ours = load(str(moved), config_path=str(path.with_suffix(".yaml")))
    assert torch.equal(ours.encode(images(2, 64)), ref.codes(images(2, 64)))


def test_chameleon_layout_tokenizes_to_1024_codes(tmp_path):
    """Chameleon's tokenizer shape: 512², f16, 8,192 codes, taming keys + yaml without a target
    (narrow channels and 8-d codes here, to stay fast)."""
    dd = ddconfig(512, [1, 1, 2, 2, 4], [])
    ref = random_taming(dd, 8192, 8)
    path = save_taming(ref, dd, 8192, 8, tmp_path / "vqgan.ckpt", target=None)
    # Through the tokenize stage's own path: config fields checked, uint8 pixels -> uint16 codes.
    cfg = TokenizeConfig(checkpoint=str(path), image_size=512, factor=16, codebook_size=8192)
    pixels = ((images(1, 512)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()[None]  # (1, R, R, 3)
    row = encode_images(load_vqgan(None, cfg), pixels, batch_size=1)
    assert row.shape == (1, 1024) and row.dtype.name == "uint16"
    want = ref.codes(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)  # (1, 32, 32)
    assert (row[0] == want.flatten().numpy()).all()


def test_yaml_and_tensors_disagree(imagenet_like, tmp_path):
    ref, _ = imagenet_like
    path = save_taming(ref, IMAGENET_LIKE, 64, 8, tmp_path / "vq.ckpt", yaml_n_embed=128)
    with pytest.raises(CheckpointError, match=r"codebook size 64 in its tensors.*model\.params\.n_embed") as e:
        load(str(path))
    assert e.value.field == "vqgan_config"
    other = dict(IMAGENET_LIKE, ch_mult=[1, 2, 2, 4])  # f8 in the yaml, f16 in the tensors
    path = save_taming(ref, other, 64, 8, tmp_path / "f8.ckpt")
    with pytest.raises(CheckpointError, match=r"downsampling factor 16 .*ddconfig\.ch_mult"):
        load(str(path))
    wider = dict(IMAGENET_LIKE, z_channels=64)  # same factor and codebook, other tensor shapes
    path = save_taming(ref, wider, 64, 8, tmp_path / "wide.ckpt")
    with pytest.raises(CheckpointError, match=r"wide.ckpt: tensor \S+ does not fit the architecture from .*wide.yaml"):
        load(str(path))


def test_config_mismatch_names_the_tokenize_field(imagenet_like):
    _, path = imagenet_like
    for expect, field in ((Expect(n_embed=8192), "codebook_size"), (Expect(factor=8), "factor"),
                          (Expect(resolution=256), "image_size")):
        with pytest.raises(CheckpointError, match=f"tokenize.{field} = ") as e:
            load(str(path), expect=expect)
        assert e.value.field == field


def test_unknown_family_yaml_is_refused(imagenet_like, tmp_path):
    ref, _ = imagenet_like
    path = save_taming(ref, IMAGENET_LIKE, 64, 8, tmp_path / "kl.ckpt",
                       target="ldm.models.autoencoder.AutoencoderKL")
    with pytest.raises(CheckpointError, match=r"model\.target = 'ldm.models.autoencoder.AutoencoderKL'"):
        load(str(path))


def llamagen_state(ref) -> dict[str, torch.Tensor]:
    """taming's weights under LlamaGen's names (its Encoder/Decoder are taming's, renamed), with
    the training-only `codebook_used` buffer it saves."""
    n = len(IMAGENET_LIKE["ch_mult"])
    inverse = {}
    for k in ref.state_dict():
        k2 = k
        for mid, i in (("block_1", 0), ("attn_1", 1), ("block_2", 2)):
            k2 = k2.replace(f".mid.{mid}.", f".mid.{i}.")
        parts = k2.split(".")
        if parts[1] in ("down", "up"):
            level = int(parts[2]) if parts[0] == "encoder" else n - 1 - int(parts[2])
            rest = ".".join(parts[3:]).replace("block.", "res.", 1) if parts[3] == "block" else ".".join(parts[3:])
            k2 = f"{parts[0]}.conv_blocks.{level}.{rest}"
        inverse[k2] = ref.state_dict()[k]
    inverse["quantize.codebook_used"] = torch.zeros(65536)
    return inverse


def test_llamagen_layout_reads_its_architecture_from_tensors(imagenet_like, tmp_path):
    """LlamaGen = taming's network under other names + an l2-normalised codebook (cosine codes)."""
    ref, _ = imagenet_like
    state = llamagen_state(ref)
    assert all(rename(k, 5) in ref.state_dict() for k in state if k != "quantize.codebook_used")
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": state, "optimizer": {}, "steps": 1}, path)
    ours = load(str(path), expect=Expect(n_embed=64, factor=16, resolution=64))
    assert ours.cfg.l2_norm and ours.cfg.ch_mult == (1, 1, 2, 2, 4)
    x = images(3, 64)
    with torch.no_grad():  # LlamaGen's quantizer: nearest by l2-normalised latents and codes
        z = F.normalize(ref.quant_conv(ref.encoder(x)).permute(0, 2, 3, 1), dim=-1)  # (B, H, W, D)
        e = F.normalize(ref.quantize.embedding.weight, dim=-1)
        want = torch.cdist(z.reshape(-1, 8), e).argmin(1).view(3, 4, 4)
    assert torch.equal(ours.encode(x), want)
    with pytest.raises(CheckpointError, match="leave tokenize.vqgan_config empty"):
        load(str(path), config_path="some.yaml")
