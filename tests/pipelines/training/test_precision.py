"""train.precision = "auto": bf16 autocast where the CPU (or GPU) computes bf16 natively."""

from __future__ import annotations

import pytest
import torch

from pipelines.training.precision import cpu_has_bf16, resolve_precision


def cpuinfo(tmp_path, flags: str) -> str:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    return str(p)


@pytest.mark.parametrize(("flags", "has"), [("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True),
                                            ("avx512f avx512bw", False), ("", False)])
def test_cpu_bf16_flags(tmp_path, flags, has):
    assert cpu_has_bf16(cpuinfo(tmp_path, flags)) is has


def test_unknown_cpu_is_fp32(tmp_path):
    assert cpu_has_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed"])
def test_an_explicit_setting_is_kept(explicit):
    assert resolve_precision(explicit, "cpu") == explicit


def test_auto_on_cpu_follows_the_hardware():
    want = "bf16-mixed" if cpu_has_bf16() else "32-true"
    assert resolve_precision("auto", "cpu") == want
    assert resolve_precision("auto", "cpu", "fsdp") == "32-true"  # TrainConfig refuses bf16 FSDP on CPU


def test_cpu_autocast_computes_matmuls_in_bf16():
    a = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_precision("bf16-mixed") != "32-true"):
        assert (a @ a).dtype == torch.bfloat16
