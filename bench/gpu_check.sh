#!/usr/bin/env bash
# One-shot check of the CUDA backend (MSCA and NMF2D kernels) on a GPU machine (no network needed). Run from the repository root:
#
#     BENCH_COMMIT=<commit> bash bench/gpu_check.sh
#
# <commit>: the commit being checked, written literally (e.g. the output of `git rev-parse --short HEAD` on the
# machine that sends the working tree): a copy without .git cannot name it, and the result files record it.
#
# 1. builds segnext_kernels._C in place (SEGNEXT_KERNELS_FORCE_BUILD=1 python3 setup.py build_ext --inplace) for the
#    local GPU's architecture (override with TORCH_CUDA_ARCH_LIST),
# 2. prints the ptxas report (registers / spills / stack, sm_80 and sm_90) of every CUDA kernel, and the Triton
#    kernels' frames as this machine's Triton compiles them,
# 3. runs the CUDA backend's GPU tests (tests/msca/test_msca_cuda_gpu.py, tests/nmf/test_nmf_cuda_gpu.py), then the Triton, module and
#    production (CUDA graphs, autocast, opcheck, memory) GPU tests,
# 4. runs the quick benchmarks (python3 -m bench.msca --quick, python3 -m bench.nmf --quick: bf16, SegNeXt stage
#    shapes; cuda, triton, eager NCHW, eager channels_last, torch.compile), each within a time budget,
# and writes everything to bench/results/ (log, build log, junit xml, CSV, JSON, PNG). When $OUT is set, after every
# step the log is copied there and the rest packed into one archive, gpu_check_<stamp>.tar.gz (the device tool
# returns at most 8 files): unpack it into bench/results/ (tar -xzf ... -C bench/results). Each step's time limit
# shrinks to keep the whole script under GPU_CHECK_SECONDS (default 560 s); a failing step is reported and the next
# one still runs. Order: build, ptxas, cuda tests, triton tests, benchmarks.
set -u
cd "$(dirname "$0")/.."
RES=bench/results
mkdir -p "$RES"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
MARK=$(mktemp)   # result files newer than this are this run's
export BENCH_COMMIT=${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
LOG="$RES/gpu_check_$STAMP.log"
exec > >(tee -a "$LOG") 2>&1
if [ "$BENCH_COMMIT" = unknown ]; then
  echo "!!! BENCH_COMMIT is not set and this copy has no git history: the results are labelled commit 'unknown'."
  echo "!!! Run it as BENCH_COMMIT=<commit> bash bench/gpu_check.sh"
fi
# pytest-xdist (on the GPU image): the Triton tests JIT-compile a few hundred kernel variants, serially about 10-18
# minutes; parallel workers share the GPU
if python3 -c "import xdist" 2>/dev/null; then
  NW=$(( $(nproc) > 8 ? 8 : $(nproc) )); XDIST="-n $NW --dist loadfile"
else
  XDIST=""
fi
T0=$(date +%s)
DEADLINE=$(( T0 + ${GPU_CHECK_SECONDS:-560} ))   # the device tool allows 600 s per call
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
STATUS=0
fail() {
  if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then echo "!!! $1 timed out (exit $2)"
  else echo "!!! $1 failed (exit $2)"; fi
  STATUS=1
}
# cap LIMIT RESERVE: LIMIT seconds, or less so that RESERVE seconds stay for the later steps (at least 20)
cap() { local c=$1 l=$(( DEADLINE - $(date +%s) - $2 )); [ $l -lt $c ] && c=$l; [ $c -lt 20 ] && c=20; echo $c; }
# copy the results so far to $OUT (if set): a call cut short still returns what it has
save() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  cp "$LOG" "$OUT/" 2>/dev/null
  # this run's other files, as one archive (names relative to bench/results)
  (cd "$RES" && find . -maxdepth 1 -type f ! -name '*.tmp' ! -name "$(basename "$LOG")" -newer "$MARK" -printf '%P\n' |
     tar -czf "$OUT/gpu_check_$STAMP.tar.gz.part" -T - 2>/dev/null) &&
    mv "$OUT/gpu_check_$STAMP.tar.gz.part" "$OUT/gpu_check_$STAMP.tar.gz"
  return 0
}
trap save EXIT
trap 'save; exit 143' TERM

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 - <<'EOF' || true
import torch, sys
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "| capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
EOF
git rev-parse --short HEAD 2>/dev/null || echo "(no git commit)"
nvcc --version | tail -2 || echo "nvcc not on PATH"

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; m,n=torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null || echo "9.0")
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export NVCC_THREADS=${NVCC_THREADS:-2}

step "build segnext_kernels._C in place (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
BUILD_START=$(date +%s)
SEGNEXT_KERNELS_FORCE_BUILD=1 timeout "$(cap 300 240)" python3 setup.py build_ext --inplace > "$RES/build_$STAMP.log" 2>&1
rc=$?
tail -n 25 "$RES/build_$STAMP.log"
echo "build: exit $rc after $(( $(date +%s) - BUILD_START )) s (full log: $RES/build_$STAMP.log)"
if [ $rc -ne 0 ]; then fail "build" $rc; fi
ls segnext_kernels/_C*.so 2>/dev/null || echo "no segnext_kernels/_C*.so (the tests will try a JIT build)"
save

step "ptxas report (nvcc -Xptxas -v, sm_80 and sm_90)"
timeout "$(cap 90 220)" python3 tests/compile/test_cuda_compile.py || fail "ptxas report" $?

step "Triton kernels' registers / stack on this machine's Triton (specialised as the JIT does; tests/helpers/triton_aot.py)"
for a in "--kernels msca --msca-shape segnext" "--kernels msca --msca-shape odd" "--kernels nmf --ranks 16,64"; do
  out=$(timeout "$(cap 40 200)" python3 tests/helpers/triton_aot.py --arch 90 --dtypes bf16,fp32 --specialize $a 2>&1)
  rc=$?   # 0: every kernel compiled without a stack frame; 1: a FAIL line below; other: the tool itself failed
  echo "$out" | grep -E "FAIL|Error|Traceback" | head -20
  if [ $rc -eq 0 ]; then echo "no stack frame ($a)"; else echo "triton_aot.py exit $rc ($a)"; echo "$out" | tail -3; fi
done

step "GPU tests of the cuda backend"
timeout "$(cap 240 130)" python3 -m pytest tests/msca/test_msca_cuda_gpu.py tests/nmf/test_nmf_cuda_gpu.py -q -rs -p no:cacheprovider \
  $XDIST --junitxml="$RES/pytest_cuda_$STAMP.xml" || fail "cuda backend tests" $?
save

step "GPU tests of the Triton kernels, fused modules and production behaviour (MSCA, NMF) ($XDIST)"
PROD=$(ls tests/integration/test_production_gpu.py 2>/dev/null)
timeout "$(cap 180 100)" python3 -m pytest tests/msca/test_msca_triton.py tests/msca/test_msca_modules.py \
  tests/nmf/test_nmf_triton.py tests/nmf/test_nmf_modules.py $PROD -q -rs -p no:cacheprovider $XDIST \
  --junitxml="$RES/pytest_triton_$STAMP.xml" || fail "triton tests" $?
save

step "quick benchmarks (bf16)"
LEFT=$(( DEADLINE - $(date +%s) ))
MSCA_S=$(( (LEFT - 70) * 2 / 3 )); [ $MSCA_S -lt 20 ] && MSCA_S=20
timeout "$(( MSCA_S + 40 ))" python3 -m bench.msca --quick --budget-s "$MSCA_S" --out "$RES" || fail "msca benchmark" $?
save
LEFT=$(( DEADLINE - $(date +%s) ))
NMF_S=$(( LEFT - 35 )); [ $NMF_S -lt 15 ] && NMF_S=15
timeout "$(( NMF_S + 25 ))" python3 -m bench.nmf --quick --budget-s "$NMF_S" --out "$RES" || fail "nmf benchmark" $?

step "done (status $STATUS)"
save
exit $STATUS
