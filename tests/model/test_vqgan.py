"""The VQGAN: taming-transformers key layout, checkpoint loading, refusal of mismatched checkpoints."""

import pytest
import torch

from model.vq.checks import CheckpointError, Expect
from model.vq.registry import load, tensor_shape
from model.vqgan import VQGAN, AttnBlock, VQGANConfig, save_checkpoint, state_fingerprint

TINY = VQGANConfig(resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                   z_channels=16, embed_dim=4, n_embed=32, norm_groups=4)


@pytest.fixture(scope="module")
def model() -> VQGAN:
    torch.manual_seed(0)
    m = VQGAN(TINY).eval()
    m.quantize.embedding.weight.data.normal_()  # spread codes so that argmin is not degenerate
    return m


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_shapes(model, images):
    codes = model.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    assert int(codes.max()) < 32
    out = model.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.abs().max() <= 1


def test_taming_key_layout(model):
    keys = set(model.state_dict())
    for k in ["encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.down.1.attn.0.q.weight", "encoder.mid.attn_1.proj_out.weight",
              "encoder.mid.block_2.conv2.bias", "encoder.norm_out.weight", "quant_conv.weight",
              "quantize.embedding.weight", "post_quant_conv.weight", "decoder.conv_in.weight",
              "decoder.up.2.block.1.conv1.weight", "decoder.up.2.upsample.conv.weight",
              "decoder.up.0.block.0.nin_shortcut.weight", "decoder.conv_out.weight"]:
        assert k in keys, k
    assert not any(k.startswith("encoder.down.2.downsample") or k.startswith("decoder.up.0.upsample")
                   for k in keys)


def test_taming_checkpoint_gives_identical_codes(model, images, tmp_path):
    """A .ckpt in taming's layout (no embedded config, plus GAN loss weights) loads weights-only."""
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(2, 2)  # taming ships these; ignored
    path = tmp_path / "taming.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, path)
    loaded = load(str(path), fallback=TINY, expect=Expect(n_embed=32, factor=4))
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert state_fingerprint(loaded) == state_fingerprint(model)


def test_own_checkpoint_embeds_architecture(model, images, tmp_path):
    path = str(tmp_path / "own.ckpt")
    save_checkpoint(model, path)
    loaded = load(path)  # no config needed: it is in the file
    assert loaded.cfg == TINY
    assert torch.equal(loaded.decode(model.encode(images)), model.decode(model.encode(images)))


def test_refuses_mismatched_codebook_and_factor(model, tmp_path):
    path = str(tmp_path / "own.ckpt")
    save_checkpoint(model, path)
    with pytest.raises(CheckpointError, match="codebook size 32 but tokenize.codebook_size = 64"):
        load(path, expect=Expect(n_embed=64))
    with pytest.raises(CheckpointError, match="downsampling factor 4 but tokenize.factor = 8"):
        load(path, expect=Expect(factor=8))
    taming = str(tmp_path / "taming.ckpt")
    torch.save({"state_dict": model.state_dict()}, taming)
    other = VQGANConfig(**{**TINY.to_dict(), "ch_mult": (1, 2, 2, 2)})
    with pytest.raises(CheckpointError, match="downsampling factor"):
        load(taming, fallback=other)


def test_missing_and_gumbel_checkpoints_say_what_to_do(model, tmp_path):
    with pytest.raises(CheckpointError, match="nope.ckpt does not exist"):
        load(str(tmp_path / "nope.ckpt"), fallback=TINY)
    state = {k.replace("quantize.embedding", "quantize.embed"): v for k, v in model.state_dict().items()}
    path = str(tmp_path / "gumbel.ckpt")
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="Gumbel"):
        load(path, fallback=TINY)


def test_attention_matches_taming_formula():
    """SDPA gives what taming's bmm/softmax AttnBlock computes."""
    torch.manual_seed(0)
    blk = AttnBlock(8, 4).eval()
    x = torch.randn(2, 8, 3, 5)
    h = blk.norm(x)
    q, k, v = blk.q(h).flatten(2), blk.k(h).flatten(2), blk.v(h).flatten(2)  # (B, C, HW)
    w = torch.softmax(q.transpose(1, 2) @ k * 8 ** -0.5, dim=2)  # (B, HWq, HWk)
    ref = x + blk.proj_out((v @ w.transpose(1, 2)).view(2, 8, 3, 5))
    assert torch.allclose(blk(x), ref, atol=1e-5)


def test_training_pass_has_gradients(model, images):
    m = VQGAN(TINY)
    recon, qloss, codes = m(images)
    (recon.abs().mean() + qloss).backward()
    assert m.encoder.conv_in.weight.grad is not None and m.quantize.embedding.weight.grad is not None


def test_factor_of_model_without_level_blocks(tmp_path):
    """num_res_blocks=0 leaves the encoder's last level without keys; the factor comes from the decoder."""
    cfg = VQGANConfig(resolution=16, ch=8, ch_mult=(1, 1, 1), num_res_blocks=0, attn_resolutions=(),
                      z_channels=8, embed_dim=4, n_embed=16, norm_groups=4)
    m = VQGAN(cfg)
    assert tensor_shape(m.state_dict(), "rb0") == {"n_embed": 16, "factor": 4}
    path = str(tmp_path / "rb0.ckpt")
    save_checkpoint(m, path)
    assert load(path, expect=Expect(n_embed=16, factor=4)).encode(torch.zeros(1, 3, 16, 16)).shape \
        == (1, 4, 4)
