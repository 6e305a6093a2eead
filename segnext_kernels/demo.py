"""End-to-end demo: SegNeXt-T on a real photograph, eager model vs. the same model with fused MSCA kernels.

Usage::

    python -m segnext_kernels.demo [--image PATH] [--checkpoint PATH] [--size N] [--out PATH]
                                   [--device cpu|cuda] [--backend auto|cpu|cuda|triton] [--seed N] [--repeats N]

What it does:

1. Loads a photograph (default: matplotlib's bundled sample ``grace_hopper.jpg``; or ``--image``) with Pillow,
   converts it to RGB, resizes it (aspect ratio kept) so that its short side is ``--size`` pixels and normalises
   it with the official SegNeXt/mmseg ImageNet mean and std (RGB).
2. Builds SegNeXt-T for the 150 ADE20K classes in eval mode. ``--checkpoint`` loads official SegNeXt or
   mmsegmentation weights (``segnext.load_checkpoint``, strict). Without one the weights are a seeded random
   initialisation and the class map means nothing (the demo says so, on the terminal and in the figure).
3. Runs the eager model and a deep copy rewritten by ``segnext_kernels.fuse`` (fused MSCA and NMF2D modules; NMF2D
   runs its reference where no fused NMF2D kernel exists for the device), under ``torch.inference_mode()``, with
   the same random NMF2D bases for both runs (the Hamburger draws fresh random bases on every forward; both runs
   draw them from one generator re-seeded before each forward).
4. Prints how many modules were fused and which backend runs them, the largest absolute and relative differences
   of the logits, the agreement of the two argmax class maps, and the wall time of each forward (median of
   ``--repeats`` runs after one warm-up, with min and max) and the fused model's speedup; writes a PNG (matplotlib,
   Agg) of the photograph and of the predicted class map blended over it.
5. Exits with status 1 if the fused logits differ from the eager ones by more than the fp32 tolerance
   ``max|fused - eager| <= 1e-3 * max(1, max|eager|)``, with status 2 on a usage or input error, 0 otherwise.

Backends (``--backend``, default ``auto``): on CPU, "auto" runs the hand-written C++ kernels ("cpu") at ``--size 512``;
on a CUDA device the Triton kernels ("cuda": the hand-written CUDA extension), with TF32 switched off for the
comparison so that both runs compute in true fp32. ``--backend triton`` on CPU runs the Triton kernels in Triton's
interpreter, which is slow, so the default size is reduced there. The demo's timings are one process's medians, a
first look; the benchmarks live in ``bench/``.

The weights of SegNeXt-T trained on ADE20K: the official SegNeXt README (github.com/Visual-Attention-Network/SegNeXt,
"ADE20K" table, SegNeXt-T) or mmsegmentation's
``segnext_mscan-t_1x16_512x512_adamw_160k_ade20k_20230210_140244-05bd8466.pth`` (configs/segnext in
github.com/open-mmlab/mmsegmentation).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

#: Official SegNeXt / mmseg normalisation (RGB, 0..255 pixel values).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

#: Default short side of the model input (the ADE20K evaluation crop), and with the Triton kernels in Triton's CPU
#: interpreter (chosen so the whole demo takes about 2 minutes on 2 CPU cores).
FULL_SIZE = 512
INTERPRETER_SIZE = 256
#: Timed forwards per model after the warm-up (the median is printed, with min and max).
REPEATS = 3

#: SegNeXt-T's input must be at least this large (four stride-2 stages after the stem, see ``segnext.SegNeXt``).
MIN_SIZE = 32

#: fp32 acceptance: max|fused - eager| <= RTOL * max(1, max|eager|).
RTOL = 1e-3

SAMPLE_IMAGE = "grace_hopper.jpg"

WEIGHTS_HINT = ("official SegNeXt-T ADE20K weights: the official SegNeXt README "
                "(github.com/Visual-Attention-Network/SegNeXt, ADE20K table, SegNeXt-T) or mmsegmentation's "
                "segnext_mscan-t_1x16_512x512_adamw_160k_ade20k_20230210_140244-05bd8466.pth")

#: The 150 ADE20K classes in the order of the model's output channels (mmseg ``ADE20KDataset``).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
NUM_CLASSES = len(ADE20K_CLASSES)


class DemoError(Exception):
    """A usage or input problem; ``main`` prints the message and returns 2."""


# ------------------------------------------------------------------------------------------------------ arguments
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segnext_kernels.demo",
        description="SegNeXt-T on a photograph: eager model vs. fused MSCA kernels (logit difference, class-map "
                    "agreement, timing) and a PNG of the predicted class map.")
    p.add_argument("--image", metavar="PATH",
                   help=f"photograph to segment (default: matplotlib's sample {SAMPLE_IMAGE})")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="official SegNeXt / mmseg SegNeXt-T ADE20K checkpoint (default: seeded random weights, "
                        "which make the class map meaningless); read with torch.load(weights_only=True)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a full pickle load of --checkpoint (RUNS CODE FROM THE FILE: trusted files only; "
                        "needed only for mmengine files whose extra entries hold non-tensor objects)")
    p.add_argument("--size", type=int, metavar="N",
                   help=f"short side of the model input in pixels, >= {MIN_SIZE} (default: {FULL_SIZE}; "
                        f"{INTERPRETER_SIZE} with --backend triton on cpu, where Triton's interpreter runs)")
    p.add_argument("--out", metavar="PATH", default="segnext_demo.png",
                   help="PNG to write (default: %(default)s in the current directory)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="cuda if available, else cpu")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda", "triton"), default="auto",
                   help="fused backend (default: %(default)s: 'cpu' = the C++ kernels on cpu, 'triton' on cuda; "
                        "'cuda' = the CUDA extension, cuda device only; 'triton' on cpu = Triton's interpreter)")
    p.add_argument("--repeats", type=int, default=REPEATS, metavar="N",
                   help="timed forwards per model after one warm-up (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights (without --checkpoint) and of the NMF2D bases (default: 0)")
    return p


# ---------------------------------------------------------------------------------------------------------- image
def _open_image(path: Optional[str]):
    """(PIL RGB image, description). Raises DemoError for a missing or unreadable file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path is None:
        import matplotlib.cbook

        try:
            with matplotlib.cbook.get_sample_data(SAMPLE_IMAGE, asfileobj=True) as fh:
                img = Image.open(fh)
                img.load()
        except (OSError, ValueError) as err:
            raise DemoError(f"cannot read matplotlib's sample image {SAMPLE_IMAGE} ({err}); pass --image PATH")
        name = f"matplotlib sample {SAMPLE_IMAGE}"
    else:
        if not os.path.isfile(path):
            raise DemoError(f"--image: no such file: {path!r}")
        try:
            with Image.open(path) as opened:
                img = ImageOps.exif_transpose(opened)
                img.load()
        except (UnidentifiedImageError, OSError) as err:
            raise DemoError(f"--image: cannot read {path!r} as an image ({err})")
        name = os.path.basename(path)
    return img.convert("RGB"), name


def _preprocess(img, size: int) -> torch.Tensor:
    """Resize (aspect ratio kept, short side = ``size``, bilinear) and normalise -> (1, 3, H, W) float32."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = img.resize((new_w, new_h), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy())  # (H, W, 3) RGB 0..255
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.permute(2, 0, 1).unsqueeze(0).contiguous()


# ---------------------------------------------------------------------------------------------------------- model
def _set_nmf_generator(model: torch.nn.Module, gen: torch.Generator) -> None:
    from segnext import NMF2D

    for m in model.modules():
        if isinstance(m, NMF2D):
            m.generator = gen


def _build_model(checkpoint: Optional[str], seed: int, gen: torch.Generator,
                 trust_pickle: bool = False) -> torch.nn.Module:
    import segnext

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = segnext.segnext_t(num_classes=NUM_CLASSES, ham_kwargs=dict(generator=gen))
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise DemoError(f"--checkpoint: no such file: {checkpoint!r}")
        try:
            segnext.load_checkpoint(model, checkpoint, strict=True, trust_pickle=trust_pickle)
        except (RuntimeError, TypeError, OSError, ValueError) as err:
            raise DemoError(f"--checkpoint: {checkpoint!r} does not load into SegNeXt-T (150 classes): {err}")
    return model.eval()


def _prepare_triton_interpreter() -> None:
    """Make the Triton kernels run in Triton's CPU interpreter (must happen before the kernels are defined)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return
    mod = sys.modules.get("segnext_kernels.msca.triton")
    if mod is not None and not getattr(mod, "INTERPRET", False):
        raise DemoError("the Triton kernels were already compiled for the GPU in this process, so they cannot run "
                        "on CPU tensors; run the demo in a fresh process (or set TRITON_INTERPRET=1 beforehand)")
    os.environ["TRITON_INTERPRET"] = "1"


@contextlib.contextmanager
def _strict_fp32():
    """Switch TF32 off for the comparison (cuDNN convs use TF32 by default), restoring the flags afterwards."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _run(model, x, gen: torch.Generator, seed: int, device: torch.device, warmup: bool, repeats: int):
    """(logits, seconds of each timed forward); one warm-up forward first when ``warmup``; the NMF2D bases
    generator is re-seeded before every forward, so every run sees the same bases. Each forward's output is dropped
    before the next one starts, as in a loop over images."""
    def once():
        gen.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        y = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return y, time.perf_counter() - t0

    if warmup:
        once()
    times, y = [], None
    for _ in range(max(1, repeats)):
        y = None  # the previous output is freed before the next forward allocates its own
        y, t = once()
        times.append(t)
    return y, times


def _spread(times) -> str:
    ts = sorted(times)
    return f"{ts[len(ts) // 2] * 1e3:.1f} ms (min {ts[0] * 1e3:.1f}, max {ts[-1] * 1e3:.1f}, {len(ts)} runs)"


# ----------------------------------------------------------------------------------------------------------- plot
def _palette() -> np.ndarray:
    """A fixed colour per class, (NUM_CLASSES, 3) floats in [0, 1]."""
    rng = np.random.default_rng(2022)
    return rng.uniform(0.1, 1.0, size=(NUM_CLASSES, 3))


def _save_figure(path: str, img, classes: np.ndarray, title: str, subtitle: str, random_weights: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    palette = _palette()
    w, h = img.size
    photo = np.asarray(img)
    fig, axes = plt.subplots(1, 2, figsize=(11, 6.2), constrained_layout=True)
    axes[0].imshow(photo)
    axes[0].set_title(f"input ({w}x{h})")
    axes[1].imshow(photo)
    axes[1].imshow(classes, cmap=ListedColormap(palette), vmin=-0.5, vmax=NUM_CLASSES - 0.5, alpha=0.55,
                   interpolation="nearest", extent=(0, w, h, 0))
    axes[1].set_title(subtitle)
    for ax in axes:
        ax.set_axis_off()
    ids, counts = np.unique(classes, return_counts=True)
    top = ids[np.argsort(-counts, kind="stable")][:6]
    share = dict(zip(ids.tolist(), (100.0 * counts / classes.size).tolist()))
    handles = [Patch(color=palette[c], label=f"{ADE20K_CLASSES[c]} ({share[int(c)]:.1f}%)") for c in top]
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False,
                   title="largest classes" + ("\n(meaningless: random weights)" if random_weights else ""))
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cpu_isa() -> str:
    from .msca import cpu

    return cpu.isa()


def _choose_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA device is available to this PyTorch; use --device cpu")
    return torch.device(name)


def _demo(args) -> int:
    from . import fuse
    from .backends import resolve

    device = _choose_device(args.device)
    if device.type == "cpu" and args.backend == "cuda":
        raise DemoError("--backend cuda needs --device cuda (on CPU use --backend cpu, or auto)")
    if args.repeats < 1:
        raise DemoError(f"--repeats: expected at least 1, got {args.repeats}")
    interpreter = device.type == "cpu" and args.backend == "triton"
    size = args.size if args.size is not None else (INTERPRETER_SIZE if interpreter else FULL_SIZE)
    if size < MIN_SIZE:
        raise DemoError(f"--size: SegNeXt needs an input of at least {MIN_SIZE} pixels, got {size}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise DemoError(f"--out: directory does not exist: {out_dir!r}")

    img, img_name = _open_image(args.image)
    if interpreter:
        _prepare_triton_interpreter()
    try:
        backend = resolve("msca", args.backend, device, torch.float32)
    except (RuntimeError, TypeError) as err:
        raise DemoError(str(err))

    gen = torch.Generator(device="cpu")
    model = _build_model(args.checkpoint, args.seed, gen, args.trust_pickle).to(device)
    fused = copy.deepcopy(model)
    _set_nmf_generator(fused, gen)  # one generator for both, re-seeded before each forward
    n_fused = fuse(fused, backend=args.backend)
    if n_fused["msca"] == 0:
        raise DemoError("fuse found no MSCA module in SegNeXt-T")  # would mean the package is broken
    x = _preprocess(img, size).to(device)

    random_weights = args.checkpoint is None
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
        how = f"{backend} kernels on the GPU"
    else:
        where = f"cpu ({_cpu_name()}, {torch.get_num_threads()} threads)"
        how = {"triton": "triton kernels in Triton's CPU interpreter (slow: reduced input size)",
               "cpu": f"cpu (hand-written C++ kernels, {_cpu_isa()})",
               "reference": "reference (eager PyTorch: no fused kernels could be had here, see the warning)"}[backend]
    print("SegNeXt-T (ADE20K, 150 classes): eager vs. fused (segnext_kernels.fuse)")
    print(f"  image        : {img_name} ({img.size[0]}x{img.size[1]}) -> model input {x.shape[3]}x{x.shape[2]} "
          f"(short side {size})")
    print(f"  device       : {where}")
    print(f"  fused backend: {how}")
    if random_weights:
        print(f"  weights      : RANDOM (seed {args.seed}) -- the predicted class map is meaningless without "
              f"trained weights.\n                 Get the {WEIGHTS_HINT}, then pass --checkpoint PATH.")
    else:
        print(f"  weights      : {args.checkpoint}")
    print(f"  NMF2D bases  : random, seed {args.seed}, identical for both runs")
    print(f"  MSCA modules fused: {n_fused['msca']}, NMF2D modules: {n_fused['ham']}")
    sys.stdout.flush()

    warmup = not interpreter
    repeats = 1 if interpreter else args.repeats
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if device.type == "cuda":
            stack.enter_context(_strict_fp32())
        ref, t_eager = _run(model, x, gen, args.seed, device, warmup, repeats)
        got, t_fused = _run(fused, x, gen, args.seed, device, warmup, repeats)

    ref64, got64 = ref.double().cpu(), got.double().cpu()
    diff = (got64 - ref64).abs()
    max_abs = diff.max().item()
    max_logit = ref64.abs().max().item()
    floor = max(RTOL * max_logit, 1e-12)  # relative difference with the denominator kept away from 0
    max_rel = (diff / ref64.abs().clamp_min(floor)).max().item()
    cls_ref = ref64.argmax(1)[0].numpy()
    cls_got = got64.argmax(1)[0].numpy()
    agree = 100.0 * float((cls_ref == cls_got).mean())
    tol = RTOL * max(1.0, max_logit)
    ok = bool(np.isfinite(max_abs)) and bool(torch.isfinite(got64).all()) and max_abs <= tol

    timing_note = ("median after one warm-up" if warmup else
                   "one cold run each; the fused time is mostly Triton's interpreter, not a kernel speed")
    print(f"  max |logit| (eager)       : {max_logit:.4g}")
    print(f"  max abs diff (fused-eager): {max_abs:.3e}   (tolerance {tol:.3e} = {RTOL:g} * max(1, max|logit|))")
    print(f"  max rel diff              : {max_rel:.3e}   (|fused-eager| / max(|eager|, {RTOL:g} * max|logit|))")
    print(f"  argmax class-map agreement: {agree:.3f} % of {cls_ref.size} pixels")
    print(f"  wall time eager           : {_spread(t_eager)}")
    print(f"  {'wall time fused (' + backend + ')':<26}: {_spread(t_fused)}")
    if not interpreter and backend != "reference":
        lo, hi = min(t_eager) / max(t_fused), max(t_eager) / min(t_fused)
        if min(t_eager) > max(t_fused):
            verdict = f"{sorted(t_eager)[len(t_eager) // 2] / sorted(t_fused)[len(t_fused) // 2]:.2f}x faster"
        elif min(t_fused) > max(t_eager):
            verdict = "slower"
        else:
            verdict = "no measurable difference (the runs overlap)"
        print(f"  fused vs eager            : {verdict} (range {lo:.2f}x-{hi:.2f}x over the runs)")
    print(f"  ({timing_note}; demo timings are a first look -- the benchmarks live in bench/)")

    weights = "RANDOM weights: class map meaningless" if random_weights else \
        f"weights {os.path.basename(args.checkpoint)}"
    backend_desc = f"{backend} (Triton interpreter)" if interpreter else backend
    title = (f"SegNeXt-T, ADE20K 150 classes | fused MSCA backend: {backend_desc} | device: {device.type} | "
             f"{weights}\ninput {x.shape[3]}x{x.shape[2]}; fused vs eager: max abs diff {max_abs:.2e}, "
             f"class maps agree on {agree:.2f}% of pixels")
    subtitle = "predicted classes (fused model)" + (" -- random weights" if random_weights else "")
    _save_figure(args.out, img, cls_got, title, subtitle, random_weights)
    print(f"  wrote {args.out}")

    if not ok:
        print(f"FAIL: fused ({backend}) and eager logits disagree: max abs diff {max_abs:.3e} > tolerance "
              f"{tol:.3e} (or non-finite output)", file=sys.stderr)
        return 1
    print("OK: fused and eager outputs agree within the fp32 tolerance")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit status (0 ok, 1 fused/eager mismatch, 2 usage or input error)."""
    args = _parser().parse_args(argv)
    try:
        return _demo(args)
    except DemoError as err:
        print(f"segnext_kernels.demo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
