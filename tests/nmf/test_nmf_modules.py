"""FusedNMF2D / fuse_ham / fuse: drop-in for segnext.NMF2D (same options, same official bases draw under the same
seed), in-place swapping inside SegNeXt-T with the state_dict unchanged, and a whole fused SegNeXt-T against the
eager model."""
import copy

import pytest
import torch

import segnext
from segnext_kernels import FusedMSCA
from segnext_kernels import FusedNMF2D, fuse, fuse_ham

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPTIONS = dict(MD_S=2, MD_R=5, train_steps=3, eval_steps=4, inv_t=1, eps=1e-6)


def _x(B=2, C=12, H=5, W=7, dtype=torch.float32):
    return torch.relu(torch.randn(B, C, H, W, device=DEVICE)).to(dtype)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grad_mode", ["unrolled", "one_step"])
def test_drop_in_same_seed_same_output(train, grad_mode):
    ref = segnext.NMF2D(**OPTIONS, grad_mode=grad_mode).train(train)
    fused = FusedNMF2D(**OPTIONS, grad_mode=grad_mode, backend="triton").train(train)
    assert isinstance(fused, segnext.NMF2D)
    assert dict(fused.state_dict()) == {} == dict(ref.state_dict())
    x = _x()
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(7)                  # the official draw: torch.rand on the CPU default generator
    out_ref = ref(xr)
    torch.manual_seed(7)
    out = fused(xf)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(out, xf, g)[0], torch.autograd.grad(out_ref, xr, g)[0],
                               rtol=1e-4, atol=1e-5)


def test_generator_option_and_explicit_bases():
    x = _x()
    ref = segnext.NMF2D(**OPTIONS, generator=torch.Generator().manual_seed(3)).eval()
    fused = FusedNMF2D(**OPTIONS, generator=torch.Generator().manual_seed(3), backend="triton").eval()
    torch.manual_seed(0)
    out_ref = ref(x)
    torch.manual_seed(1)                  # the global RNG does not matter with a generator
    torch.testing.assert_close(fused(x), out_ref, rtol=1e-5, atol=1e-6)
    # explicit bases (B*S, D, R) bypass the draw, in any floating dtype; a wrong shape is rejected
    bases = torch.nn.functional.normalize(torch.rand(4, 6, 5, device=DEVICE), dim=1)
    torch.testing.assert_close(fused(x, bases), ref(x, bases), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bases must have shape"):
        fused(x, bases[:, :, :4])
    with pytest.raises(ValueError, match="not divisible"):
        fused(_x(C=11))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_like_reference_module(dtype):
    ref = segnext.NMF2D(MD_R=4, eval_steps=3).eval()
    fused = FusedNMF2D(MD_R=4, eval_steps=3, backend="triton").eval()
    x = _x(dtype=dtype)
    torch.manual_seed(5)
    out_ref = ref(x)
    torch.manual_seed(5)
    out = fused(x)
    assert out.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, out_ref, **tol)


def test_from_module_options_and_errors():
    gen = torch.Generator()
    ref = segnext.NMF2D(MD_S=1, MD_R=16, train_steps=5, eval_steps=9, inv_t=1, eps=1e-5, grad_mode="one_step",
                        generator=gen).eval()
    fused = FusedNMF2D.from_module(ref, backend="reference")
    assert (fused.S, fused.R, fused.train_steps, fused.eval_steps, fused.eps, fused.grad_mode) == \
        (1, 16, 5, 9, 1e-5, "one_step")
    assert fused.generator is gen and not fused.training and fused.backend == "reference"
    assert "backend='reference'" in repr(fused)
    with pytest.raises(TypeError, match="NMF2D"):
        FusedNMF2D.from_module(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="backend"):
        FusedNMF2D(backend="cudnn")
    assert FusedNMF2D(backend="cuda").backend == "cuda"  # availability is checked at the first forward
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            FusedNMF2D(backend="cuda")(torch.rand(1, 16, 4, 4))


def test_fuse_ham_swaps_in_place_state_dict_unchanged():
    model = segnext.segnext_t(ham_kwargs=dict(grad_mode="one_step"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_ham(model, backend="reference") == 1
    ham = model.decode_head.hamburger.ham
    assert isinstance(ham, FusedNMF2D) and ham.R == 16 and ham.eval_steps == 7 and ham.train_steps == 6
    assert ham.grad_mode == "one_step"
    assert not any(type(m) is segnext.NMF2D for m in model.modules())
    after = model.state_dict()
    assert list(after.keys()) == list(before.keys())
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert fuse_ham(model) == 0                       # idempotent
    segnext.segnext_t().load_state_dict(after)        # loads into a fresh reference model


def test_fuse_returns_both_counts():
    model = segnext.segnext_t()
    keys = list(model.state_dict().keys())
    assert fuse(model, backend="reference") == {"msca": 3 + 3 + 5 + 2, "ham": 1,
                                                "block": 0, "conv1x1": 0, "resize": 0, "norm": 0, "embed": 0,
                                                "group_norm": 0, "head": 0}
    assert sum(isinstance(m, FusedMSCA) for m in model.modules()) == 13
    assert sum(isinstance(m, FusedNMF2D) for m in model.modules()) == 1
    assert list(model.state_dict().keys()) == keys
    assert fuse(model) == {"msca": 0, "ham": 0, "block": 13,
                           "conv1x1": 5, "resize": 2, "norm": 4, "embed": 4, "group_norm": 3, "head": 1}  # CPU blocks, head
    with pytest.raises(ValueError, match="backend"):
        fuse(segnext.segnext_t(), backend="nope")
    model = segnext.segnext_t()
    if DEVICE.type == "cuda":
        model = model.to(DEVICE)
        assert fuse(model, backend="cuda") == {"msca": 13, "ham": 1, "block": 0,
                                               "conv1x1": 0, "resize": 0, "norm": 0, "embed": 0, "group_norm": 0, "head": 0}
        assert model.decode_head.hamburger.ham.backend == "cuda"
        assert all(m.backend == "cuda" for m in model.modules() if isinstance(m, FusedMSCA))
    else:  # checked at swap time: nothing is swapped
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            fuse(model, backend="cuda")
        assert not any(isinstance(m, (FusedMSCA, FusedNMF2D)) for m in model.modules())


def test_fused_segnext_t_matches_eager_model():
    torch.manual_seed(0)
    eager = segnext.segnext_t(num_classes=19).to(DEVICE).eval()
    fused = copy.deepcopy(eager)
    assert fuse(fused, backend="triton") == {"msca": 13, "ham": 1, "block": 0,
                                             "conv1x1": 0, "resize": 0, "norm": 0, "embed": 0, "group_norm": 0, "head": 0}
    images = torch.randn(1, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        torch.manual_seed(1)      # the NMF bases are drawn from the global CPU generator in both models
        ref = eager(images)
        torch.manual_seed(1)
        out = fused(images)
    assert out.shape == (1, 19, 64, 64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_fused_ham_decoder_gradients_match():
    # train mode, only the NMF2D fused (the backbone stays eager): every parameter gradient of the model
    torch.manual_seed(0)
    eager = segnext.segnext_t(num_classes=7).to(DEVICE).train()
    fused = copy.deepcopy(eager)
    assert fuse_ham(fused, backend="triton") == 1
    images = torch.randn(1, 3, 48, 40, device=DEVICE)
    target = torch.randint(0, 7, (1, 48, 40), device=DEVICE)
    for model, seed in ((eager, 2), (fused, 2)):
        torch.manual_seed(seed)   # same DropPath / Dropout2d / NMF draws
        torch.nn.functional.cross_entropy(model(images), target).backward()
    fused_params = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        q = fused_params[name]
        scale = p.grad.abs().max().item() + 1e-12
        err = (q.grad - p.grad).abs().max().item()
        assert err <= 1e-3 * scale + 1e-7, f"{name}: grad error {err:.3e} vs scale {scale:.3e}"
