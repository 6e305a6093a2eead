"""FusedMSCA / fuse_msca: drop-in for segnext.AttentionModule, state_dict round trips, and a whole fused SegNeXt-T
against the eager model (logits and every parameter gradient)."""
import copy

import pytest
import torch

import segnext
from segnext_kernels import FusedMSCA, fuse_msca

from msca_helpers import DEVICE, check_fused_segnext_t_matches_eager


def test_state_dict_round_trip():
    ref = segnext.AttentionModule(12)
    fused = FusedMSCA(12)
    assert list(fused.state_dict().keys()) == list(ref.state_dict().keys())
    assert all(a.shape == b.shape for a, b in zip(fused.state_dict().values(), ref.state_dict().values()))
    fused.load_state_dict(ref.state_dict())           # reference -> fused
    back = segnext.AttentionModule(12)
    back.load_state_dict(fused.state_dict())          # fused -> reference
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_from_module_shares_weights_and_matches(backend):
    ref = segnext.AttentionModule(6).to(DEVICE)
    fused = FusedMSCA.from_module(ref, backend=backend)
    assert fused.conv0.weight is ref.conv0.weight and fused.conv3.bias is ref.conv3.bias
    x = torch.randn(2, 6, 9, 12, device=DEVICE)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="conv0"):
        FusedMSCA.from_module(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="backend"):
        FusedMSCA(4, backend="cudnn")


def test_fuse_msca_swaps_every_module_in_place():
    model = segnext.segnext_t()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = fuse_msca(model, backend="reference")
    assert n == 3 + 3 + 5 + 2                          # MSCAN-T depths
    assert not any(type(m).__name__ == "AttentionModule" for m in model.modules())
    assert sum(isinstance(m, FusedMSCA) for m in model.modules()) == n
    after = model.state_dict()
    assert list(after.keys()) == list(before.keys())
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert fuse_msca(model) == 0                       # idempotent
    # the fused model's state_dict loads into a fresh reference model
    segnext.segnext_t().load_state_dict(after)


def test_fused_segnext_t_matches_eager_model():
    check_fused_segnext_t_matches_eager("triton", DEVICE)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_matches_eager_autocast(backend):
    # fp32 parameters, autocast to bf16: the fused module runs its convs in bf16 like eager's, returns eager's dtype
    # (the gating att * u promotes with the fp32 u) and gets gradients for its fp32 parameters.
    ref = segnext.AttentionModule(5).to(DEVICE)
    fused = FusedMSCA.from_module(copy.deepcopy(ref), backend=backend)
    x = torch.randn(1, 5, 7, 9, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        want = ref(x)
        got = fused(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item())
    got.float().sum().backward()
    assert fused.conv0.weight.grad is not None and fused.conv0.weight.grad.dtype == torch.float32


def test_fuse_checks_the_backend_where_the_parameters_are(monkeypatch):
    """fuse_msca / fuse raise at swap time, with the error the first forward would give, and swap nothing."""
    from segnext_kernels import backends, fuse

    model = segnext.segnext_t()
    monkeypatch.setattr(backends, "_TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match="backend='triton' is not available: Triton kernels need CUDA tensors"):
        fuse_msca(model, backend="triton")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: the CUDA backend needs CUDA tensors"):
        fuse(model, backend="cuda")
    assert not any(isinstance(m, FusedMSCA) for m in model.modules())
    u = torch.randn(1, 32, 8, 8)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: the CUDA backend needs CUDA tensors"):
        FusedMSCA(32, backend="cuda")(u)  # the same message at the first forward
    with pytest.raises(TypeError, match="backend='cuda'.*take float32, float16, bfloat16, got float64"):
        backends.resolve("msca", "cuda", torch.device("cuda"), torch.float64)
