"""Body precision (mtl.precision): resolution of "auto", mixed precision in every architecture,
and the training entry point's default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import mtl.precision as precision
from mtl.models import build_model
from mtl.precision import DEFAULT_PRECISION, native_bfloat16, resolve_compute_dtype
from pipeline.train import ModelConfig, TrainConfig, build
from tests.test_models import VARIANTS, make_batch, make_spec

CPU = torch.device("cpu")


@pytest.fixture
def bf16_native(monkeypatch: pytest.MonkeyPatch):
    """Pretend the CPU has (or lacks) native bfloat16: call with True / False."""

    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "native_bfloat16", lambda device_type, index=None: value)

    return set_native


def test_explicit_precisions_resolve_to_themselves() -> None:
    assert resolve_compute_dtype(None, CPU, torch.float32) is torch.float32
    assert resolve_compute_dtype(None, CPU, torch.float64) is torch.float64
    assert resolve_compute_dtype("float32", CPU, torch.float32) is torch.float32
    assert resolve_compute_dtype("float32", CPU, torch.float64) is torch.float64  # "no cast"
    assert resolve_compute_dtype("bfloat16", CPU, torch.float32) is torch.bfloat16
    assert resolve_compute_dtype(torch.bfloat16, CPU, torch.float32) is torch.bfloat16
    assert resolve_compute_dtype("bfloat16", CPU, torch.float64) is torch.float64  # never down-cast float64
    for bad in ("float16x", "float64", torch.float16):
        with pytest.raises(ValueError, match="compute_dtype"):
            resolve_compute_dtype(bad, CPU, torch.float32)
    with pytest.raises(ValueError, match="compute_dtype"):
        build_model("mmoe", make_spec(2), compute_dtype="half")


def test_auto_is_bfloat16_only_on_native_hardware_and_only_for_float32(bf16_native) -> None:
    bf16_native(True)
    assert resolve_compute_dtype("auto", CPU, torch.float32) is torch.bfloat16
    assert resolve_compute_dtype("auto", CPU, torch.float64) is torch.float64  # never down-cast float64
    bf16_native(False)
    assert resolve_compute_dtype("auto", CPU, torch.float32) is torch.float32


def test_cpu_detection_agrees_with_cpuinfo_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    assert native_bfloat16("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert native_bfloat16("meta") is False


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_architecture_runs_mixed_precision_close_to_float32(variant: str) -> None:
    """bfloat16 body: logits, parameters and gradients stay float32 and agree with the float32
    model of the same weights to bfloat16 precision; task_grad_scale still reaches the body."""
    name, kwargs = VARIANTS[variant]
    spec = make_spec(3)
    torch.manual_seed(0)
    fp32 = build_model(name, spec, **kwargs(3))
    bf16 = build_model(name, spec, compute_dtype="bfloat16", **kwargs(3))
    bf16.load_state_dict(fp32.state_dict())
    fp32.eval()  # SNR: deterministic 0/1 routing, so both models route alike
    bf16.eval()
    batch = make_batch(64, seed=3)
    out32, out16 = fp32(batch), bf16(batch)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.03)
    assert not torch.equal(out16, out32)  # the body really ran in bfloat16
    labels = torch.randint(0, 2, out32.shape, generator=torch.Generator().manual_seed(4)).float()
    scale = torch.tensor([0.5, 1.0, 2.0])
    for model in (fp32, bf16):
        F.binary_cross_entropy_with_logits(model(batch, task_grad_scale=scale), labels).backward()
    for (pname, p32), p16 in zip(fp32.named_parameters(), bf16.parameters()):
        if p32.grad is None:
            assert p16.grad is None, pname
            continue
        assert p16.dtype == torch.float32 and p16.grad.dtype == torch.float32, pname
        cos = F.cosine_similarity(p32.grad.flatten(), p16.grad.flatten(), dim=0)
        assert cos > 0.98, f"{variant} {pname}: gradient cosine {cos:.4f}"


@pytest.mark.parametrize("variant", ["mmoe", "shared_bottom", "ple_2"])
def test_auto_without_native_bfloat16_is_exact_float32(variant: str, bf16_native) -> None:
    bf16_native(False)
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    exact = build_model(name, make_spec(2), **kwargs(2))
    auto = build_model(name, make_spec(2), compute_dtype="auto", **kwargs(2))
    auto.load_state_dict(exact.state_dict())
    batch = make_batch(32, seed=5)
    assert torch.equal(auto(batch), exact(batch))
    bf16_native(True)
    assert not torch.equal(auto(batch), exact(batch))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_models_are_never_down_cast(variant: str, bf16_native) -> None:
    bf16_native(True)
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    exact = build_model(name, make_spec(2), **kwargs(2)).double().eval()
    batch = make_batch(16, seed=5)
    want = exact(batch)
    assert want.dtype == torch.float64
    for setting in ("auto", "bfloat16", "float32"):
        model = build_model(name, make_spec(2), compute_dtype=setting, **kwargs(2)).double().eval()
        model.load_state_dict(exact.state_dict())
        assert torch.equal(model(batch), want), setting


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_logits_are_not_rounded_to_bfloat16(variant: str) -> None:
    """Every architecture computes its last (logit) layer in float32 under mixed precision: the
    logits of many rows stay distinct (bfloat16-rounded logits would tie scores a ranking metric
    must tell apart)."""
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(1)
    model = build_model(name, make_spec(2), compute_dtype="bfloat16", **kwargs(2)).eval()
    logits = model(make_batch(512, seed=6))
    rounded = logits.to(torch.bfloat16).float()
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, rounded)
    assert logits[:, 0].unique().numel() > rounded[:, 0].unique().numel()


def test_training_default_precision_is_auto_and_reaches_the_model() -> None:
    assert TrainConfig().precision == DEFAULT_PRECISION == "auto"
    cfg = TrainConfig(model=ModelConfig(name="shared_bottom"), precision="float32")
    model = build(cfg, make_spec(2)).model
    assert model.compute_dtype == "float32"
    for bad in ("fp8", "float64"):
        with pytest.raises(ValueError, match="precision"):
            TrainConfig(precision=bad)
    with pytest.raises(ValueError, match="train.precision"):
        TrainConfig(model=ModelConfig(name="mmoe", params={"compute_dtype": "bfloat16"}))
