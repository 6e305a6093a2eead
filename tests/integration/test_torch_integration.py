"""The fused ops as first-class PyTorch operators: torch.library custom ops (opcheck), torch.compile(fullgraph) with
the kernels opaque, no_grad / inference_mode saving nothing, partial requires_grad, determinism, and DDP (gloo, 2
processes on CPU). Triton kernels run in the interpreter here (conftest sets TRITON_INTERPRET=1 without a GPU)."""
import copy
import os
import socket
import tempfile

import pytest
import torch
import torch.nn.functional as F

import segnext
from segnext_kernels.nmf.reference import nmf2d_reference
from segnext_kernels import FusedMSCA, FusedNMF2D, fuse, msca, nmf2d
from segnext_kernels.msca.interface import param_dtype
from segnext_kernels.msca.reference import msca_reference, pack_weights

from msca_helpers import DEVICE, make_msca

OPS = torch.ops.segnext_kernels


def _packed(args):
    u, w0, b0, sw, sb, w3, b3 = args
    return (u, *pack_weights(w0, b0, sw, sb, w3, b3, param_dtype(u)))


def _nmf_inputs(B=2, D=8, N=12, R=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, D, N, generator=g, dtype=dtype).to(DEVICE)
    bases = F.normalize(torch.rand(B, D, R, generator=g), dim=1).to(DEVICE, torch.promote_types(dtype, torch.float32))
    return x, bases


# ------------------------------------------------------------------------------------------------------ opcheck
_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_msca_ops():
    u, *w = _packed(make_msca(1, 2, 4, 5, seed=0, device=DEVICE))
    args = [u.requires_grad_(), *(t.requires_grad_() for t in w), "triton"]
    torch.library.opcheck(OPS.msca_fwd, args, test_utils=_OPCHECK_TESTS)
    g = torch.randn_like(u)
    for needs in ([True] * 7, [False, True, False, True, False, False, True]):
        torch.library.opcheck(OPS.msca_bwd, [g, u.detach(), *(t.detach() for t in w), needs, "triton"],
                              test_utils=("test_schema", "test_faketensor"))  # no autograd of its own
    # channels_last u: the fake keeps the memory format
    ucl = u.detach().to(memory_format=torch.channels_last)
    torch.library.opcheck(OPS.msca_fwd, [ucl, *(t.detach() for t in w), "triton"], test_utils=("test_faketensor",))


@pytest.mark.parametrize("mode", ["unrolled", "one_step"])
def test_opcheck_nmf_ops(mode):
    x, b = _nmf_inputs(B=1, D=4, N=6, R=3)
    K = 1
    fwd = [x.requires_grad_(), b.requires_grad_(), K, 1e-6, 1.0, mode, True, "triton"]
    torch.library.opcheck(OPS.nmf2d_fwd, fwd, test_utils=_OPCHECK_TESTS)
    torch.library.opcheck(OPS.nmf2d_fwd, [x.detach(), b.detach(), K, 1e-6, 1.0, "none", False, "triton"],
                          test_utils=("test_schema", "test_faketensor"))
    with torch.no_grad():
        y, bk, cf, saved = OPS.nmf2d_fwd(x, b, K, 1e-6, 1.0, mode, True, "triton")
    bwd = [torch.rand_like(y), torch.rand_like(bk), None, x.detach(), list(saved), mode, K, 1e-6, 1.0, True, True,
           "triton"]
    torch.library.opcheck(OPS.nmf2d_bwd, bwd, test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------ torch.compile
def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def _grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


def test_compile_fused_msca_fullgraph():
    torch.manual_seed(0)
    m = FusedMSCA(6, backend="triton")
    x = torch.randn(2, 6, 9, 8)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    me, mc = m, copy.deepcopy(m)
    out_e = me(xe)
    out_c = _compiled(mc)(xc)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    g = torch.randn_like(out_e)
    out_e.backward(g)
    out_c.backward(g)
    for a, b in zip(_grads(mc, xc), _grads(me, xe)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["unrolled", "one_step"])
def test_compile_fused_nmf2d_fullgraph(mode):
    from torch._dynamo.testing import CompileCounterWithBackend

    m = FusedNMF2D(MD_S=1, MD_R=4, train_steps=2, eval_steps=3, grad_mode=mode, backend="triton").eval()
    x = torch.rand(2, 8, 4, 5)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(3)
    out_e = m(xe)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, backend=counter, fullgraph=True)
    torch.manual_seed(3)
    out_c = cm(xc)  # NMF2D draws its bases with torch.rand (CPU default generator) inside forward
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.manual_seed(4)
    cm(x.clone().requires_grad_())  # another seed: same graph, no recompile
    assert counter.frame_count == 1
    g = torch.rand_like(out_e)
    out_e.backward(g)
    out_c.backward(g)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)
    # the functional op with return_state, too
    xf, b = _nmf_inputs()
    f = _compiled(lambda x, b: nmf2d(x, b, 2, grad_mode=mode, return_state=True, backend="triton"))
    for got, ref in zip(f(xf, b), nmf2d(xf, b, 2, grad_mode=mode, return_state=True, backend="triton")):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fused_nmf2d_with_generator_fullgraph(backend):
    """FusedNMF2D(generator=g) compiles with fullgraph=True (the draw from g runs in the custom op
    segnext_kernels::nmf_rand_bases, as dynamo cannot trace torch.rand(..., generator=g)), draws the same bases as
    eager call after call (g advances alike), and does not touch the global RNG; a deep copy draws from its own copy
    of g; reassigning the generator recompiles (the graph holds the generator's key as a constant)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    opts = dict(MD_S=2, MD_R=3, eval_steps=2, backend=backend)
    x = torch.rand(2, 8, 4, 5, device=DEVICE)
    eager = FusedNMF2D(**opts, generator=torch.Generator().manual_seed(5)).eval()
    compiled_module = FusedNMF2D(**opts, generator=torch.Generator().manual_seed(5)).eval()
    ref = segnext.NMF2D(**{k: v for k, v in opts.items() if k != "backend"},
                        generator=torch.Generator().manual_seed(5)).eval()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    cm = torch.compile(compiled_module, backend=counter, fullgraph=True)
    rng = torch.get_rng_state()
    for _ in range(2):
        out_c, out_e, out_r = cm(x), eager(x), ref(x)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        torch.testing.assert_close(out_e, out_r, rtol=0 if backend == "reference" else 1e-5, atol=1e-6)
    assert counter.frame_count == 1
    assert torch.equal(torch.get_rng_state(), rng)
    twin = copy.deepcopy(eager)
    assert twin.generator is not eager.generator
    torch.testing.assert_close(twin(x), eager(x), rtol=0, atol=0)
    compiled_module.generator = torch.Generator().manual_seed(5)
    eager.generator = torch.Generator().manual_seed(5)
    torch.testing.assert_close(cm(x), eager(x), rtol=0, atol=0)
    assert counter.frame_count == 2
    torch.library.opcheck(torch.ops.segnext_kernels.nmf_rand_bases,
                          (eager._generator_key, 4, 3, 2, x.device), test_utils=("test_schema", "test_faketensor"))


def test_compile_small_fused_segnext_t_fullgraph():
    torch.manual_seed(0)
    model = segnext.segnext_t(num_classes=5, embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), drop_path_rate=0.0,
                              channels=32, ham_channels=32, ham_kwargs=dict(MD_R=4, train_steps=1, eval_steps=1))
    assert fuse(model, backend="triton") == {"msca": 4, "ham": 1, "block": 0,
                                             "conv1x1": 0, "resize": 0, "norm": 0, "embed": 0, "group_norm": 0, "head": 0}
    model.eval()
    mc = copy.deepcopy(model)
    images = torch.randn(1, 3, 32, 24)
    torch.manual_seed(1)
    ref = model(images)
    cm = _compiled(mc)
    torch.manual_seed(1)
    out = cm(images)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref.square().mean().backward()
    out.square().mean().backward()
    pc = dict(mc.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            assert pc[name].grad is None, name
            continue
        torch.testing.assert_close(pc[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_fullgraph_and_export_cpu_fused_segnext_t():
    """The model as ``fuse`` leaves it on CPU (fused blocks, head 1x1s, GroupNorms, the reordered squeeze, ...):
    torch.compile(fullgraph=True) traces it without a graph break (the direct kernel paths step aside inside a
    trace) and torch.export records it; both give eager's logits (same seed: the NMF bases are random per call)."""
    torch.manual_seed(0)
    model = segnext.segnext_t(num_classes=5, embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), drop_path_rate=0.0,
                              channels=32, ham_channels=32, ham_kwargs=dict(MD_R=4, train_steps=1, eval_steps=1)).eval()
    fused = copy.deepcopy(model)
    r = fuse(fused)
    assert r["block"] == 4 and r["conv1x1"] == 5 and r["head"] == 1
    images = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.manual_seed(1)
        ref = model(images)
        cm = _compiled(fused)
        torch.manual_seed(1)
        torch.testing.assert_close(cm(images), ref, rtol=1e-5, atol=1e-5)
        ep = torch.export.export(fused, (images,))
        torch.manual_seed(1)
        torch.testing.assert_close(ep.module()(images), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ no_grad / inference / partial
class _SaveCounter:
    def __init__(self):
        self.n = 0

    def __enter__(self):
        def pack(t):
            self.n += 1
            return t
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode_save_nothing(ctx):
    args = make_msca(1, 4, 6, 5, seed=1, device=DEVICE)
    for t in (args[0], args[1], args[5]):
        t.requires_grad_()
    x, b = _nmf_inputs()
    x.requires_grad_()
    with _SaveCounter() as c, ctx():
        out = msca(*args, backend="triton")
        y = nmf2d(x, b, 2, backend="triton")
        y2, bk, cf = nmf2d(x, b, 2, return_state=True, backend="triton")
    assert c.n == 0
    for t in (out, y, y2, bk, cf):
        assert not t.requires_grad and t.grad_fn is None
    torch.testing.assert_close(out, msca_reference(*args).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, nmf2d_reference(x, b, 2).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["u", "conv3", "strip2"])
def test_msca_partial_requires_grad(which):
    args = make_msca(1, 4, 6, 5, seed=2, device=DEVICE)
    u, w0, b0, sw, sb, w3, b3 = args
    leaf = {"u": u, "conv3": w3, "strip2": sw[2]}[which]
    leaf.requires_grad_()
    out = msca(*args, backend="triton")
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, leaf, g)
    (ref,) = torch.autograd.grad(msca_reference(*args), leaf, g)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["unrolled", "one_step"])
def test_nmf_partial_requires_grad(mode):
    x, b = _nmf_inputs(seed=3)
    for which in ("x", "bases"):
        xx, bb = x.clone(), b.clone()
        leaf = xx if which == "x" else bb
        leaf.requires_grad_()
        y = nmf2d(xx, bb, 0 if which == "bases" else 2, grad_mode=mode, backend="triton")
        yr = nmf2d_reference(xx, bb, 0 if which == "bases" else 2, grad_mode=mode)
        g = torch.rand_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, leaf, g)[0], torch.autograd.grad(yr, leaf, g)[0],
                                   rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- determinism
def _run_msca_twice():
    res = []
    for _ in range(2):
        args = make_msca(1, 4, 5, 6, seed=4, device=DEVICE)
        leaves = [args[0], args[1], args[2], *args[3], *args[4], args[5], args[6]]
        for t in leaves:
            t.requires_grad_()
        out = msca(*args, backend="triton")
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out) * 0.5)
        res.append([out.detach(), *grads])
    return res


def test_deterministic_algorithms_bitwise():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = _run_msca_twice()
        for s, t in zip(a, b):
            assert torch.equal(s, t)
        for mode in ("unrolled", "one_step"):
            runs = []
            for _ in range(2):
                x, bases = _nmf_inputs(seed=5)
                x.requires_grad_()
                bases.requires_grad_()
                y, bk, cf = nmf2d(x, bases, 2, grad_mode=mode, return_state=True, backend="triton")
                loss = y.sum() + cf.square().sum() + (bk.sum() if bk.requires_grad else 0)
                gx, gb = torch.autograd.grad(loss, [x, bases], allow_unused=True)
                runs.append([y, bk, cf, gx] + ([gb] if gb is not None else []))
            assert len(runs[0]) == len(runs[1])
            for s, t in zip(*runs):
                assert torch.equal(s.detach(), t.detach()), mode
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


# ----------------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Net(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 4, 1)
        self.attn = FusedMSCA(4, backend=backend)

    def forward(self, x):
        return self.attn(self.proj(x))


def _ddp_worker(rank, world, port, states, data, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported in this fresh process
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)  # two processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        grads = {}
        for backend, state in states.items():
            net = _Net(backend)
            net.load_state_dict(state)
            ddp = DDP(net)
            x = data.chunk(world)[rank]
            ddp(x).square().mean().backward()  # one training step's gradients, all-reduced by DDP
            grads[backend] = {n: p.grad for n, p in net.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"g{rank}.pt"))
        dist.barrier()  # neither rank tears its gloo pairs down while the other still uses them
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo():
    """FusedMSCA (reference and Triton-interpreter backends) under DDP, 2 CPU processes: gradients equal a single
    process on the concatenated batch."""
    import time

    import torch.multiprocessing as mp

    backends = ("reference", "triton")
    torch.manual_seed(0)
    nets = {b: _Net(b) for b in backends}
    data = torch.randn(4, 3, 6, 5)
    with tempfile.TemporaryDirectory() as d:
        states = {b: n.state_dict() for b, n in nets.items()}
        ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), states, data, d), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 150
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("DDP workers did not finish within 150 s")
        grads = [torch.load(os.path.join(d, f"g{r}.pt")) for r in range(2)]
    for b, net in nets.items():
        # single process on the whole batch: DDP averages the per-rank mean losses = the mean over the full batch
        net(data).square().mean().backward()
        for name, p in net.named_parameters():
            for r in range(2):
                torch.testing.assert_close(grads[r][b][name], p.grad, rtol=1e-5, atol=1e-6,
                                           msg=f"{b} {name} rank {r}")
