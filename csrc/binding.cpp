// PyTorch binding of the hand-written CUDA kernels (MSCA and NMF2D): the only file that includes <torch/extension.h>.
//
// Registers the custom ops
//   segnext::msca_forward(Tensor u, Tensor w0, Tensor b0, Tensor ws, Tensor bs, Tensor w3, Tensor b3) -> Tensor
//   segnext::msca_backward(Tensor grad_out, Tensor u, Tensor w0, Tensor b0, Tensor ws, Tensor bs, Tensor w3,
//                          Tensor b3, bool[7] needs_input_grad) -> (Tensor x 7)
// with CUDA kernels, and the pybind11 functions nmf_geom / nmf_bases / nmf_coef / nmf_bwd_stage / nmf_gx (the NMF2D
// launchers, see the NMF2D section below). The ops' fake (meta) implementations live in Python
// (segnext_kernels/msca_cuda.py, registered as soon as this library is loaded through that module;
// set_python_module below tells torch where to find them).
//
// Environment knobs read at every call (cheap getenv):
//   SEGNEXT_MSCA_CUDA_TILE / SEGNEXT_MSCA_CUDA_TILE_BWD  force a tile configuration (0..5, see msca_fwd.cu)
//   SEGNEXT_MSCA_CUDA_POISON=1                           fill outputs and workspace with NaN before the launch (tests)
//   SEGNEXT_MSCA_CUDA_CL_DIRECT=1                        channels_last u: tile loads read u in place (no NCHW copy)
//   SEGNEXT_MSCA_CUDA_DW=auto|tc|fma                     depthwise part of the forward and the backward's recompute:
//                                                        tensor cores (fp16/bf16) or fp32 FMA (msca_dw_tc.cuh); read
//                                                        by each op: keep it unchanged from a forward to its backward
//
// Built with -DSEGNEXT_EMU (g++ only, CPU torch; tests/integration/test_cuda_backend_emu.py), the same binding registers the ops
// for CPU tensors and the kernels run in the CPU emulation of tests/helpers/emu/cuda_emu.h: the device-runtime calls below
// (device guard, stream, device attributes, launch-error check) are the only lines that differ.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef SEGNEXT_EMU
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <cuda_runtime_api.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "msca_params.h"
#include "nmf_params.h"

namespace {

// ---- the device runtime (CUDA; or the CPU emulation) ----------------------------------------------------------------
#ifdef SEGNEXT_EMU
#define SK_KERNEL_DEVICE CPU  // dispatch key of the ops' kernels
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
cudaStream_t current_stream() { return nullptr; }
int smem_limit_of_device(const at::Tensor&) { return 232448; }  // as an H100 (opt-in shared memory per block)
int num_sms_of_device(const at::Tensor&) { return 132; }         // as an H100 SXM
void check_launch(const char*) {}                                // the emulation throws instead
#else
#define SK_KERNEL_DEVICE CUDA
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int smem_limit_of_device(const at::Tensor& t) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.get_device()));
  return bytes;
}

int num_sms_of_device(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return sms;
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}
#endif

int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  return std::atoi(v);
}

// SEGNEXT_MSCA_CUDA_DW: "auto" (or unset), "tc" or "fma" -> MscaDwVariant.
int dw_variant_from_env() {
  const char* v = std::getenv("SEGNEXT_MSCA_CUDA_DW");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return MSCA_DW_AUTO;
  if (std::strcmp(v, "tc") == 0) return MSCA_DW_TC;
  if (std::strcmp(v, "fma") == 0) return MSCA_DW_FMA;
  TORCH_CHECK(false, "SEGNEXT_MSCA_CUDA_DW: expected 'auto', 'tc' or 'fma', got '", v, "'");
  return MSCA_DW_AUTO;
}

bool poison_enabled() { return env_int("SEGNEXT_MSCA_CUDA_POISON", 0) != 0; }

void poison(at::Tensor& t) {
  if (t.numel() == 0) return;
  if (t.scalar_type() == at::kByte) t.fill_(255);  // 0xFF bytes are NaN in fp32/fp16/bf16
  else t.fill_(std::numeric_limits<double>::quiet_NaN());
}

int dtype_code(const at::Tensor& u) {
  switch (u.scalar_type()) {
    case at::kFloat: return MSCA_F32;
    case at::kHalf: return MSCA_F16;
    case at::kBFloat16: return MSCA_BF16;
    default:
      TORCH_CHECK(false, "u: the cuda MSCA backend supports float32, float16 and bfloat16, got ", u.scalar_type(),
                  " (use backend='triton' or 'reference' for other dtypes)");
  }
  return -1;
}

void check_u(const at::Tensor& u) {
  TORCH_CHECK(on_kernel_device(u), "u: expected a CUDA tensor, got one on ", u.device());
  TORCH_CHECK(u.dim() == 4, "u: expected a 4-D tensor (B, C, H, W), got shape ", u.sizes());
  TORCH_CHECK(u.size(1) >= 1, "u: expected C >= 1 channels, got shape ", u.sizes());
  dtype_code(u);
}

void check_param(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& u) {
  TORCH_CHECK(t.device() == u.device(), name, ": expected a tensor on ", u.device(), " (the device of u), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32 packed weights, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_params(const at::Tensor& u, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& ws,
                  const at::Tensor& bs, const at::Tensor& w3, const at::Tensor& b3) {
  const int64_t C = u.size(1);
  check_param(w0, "w0", {C, 25}, u);
  check_param(b0, "b0", {C}, u);
  check_param(ws, "ws", {C, 78}, u);
  check_param(bs, "bs", {C, 6}, u);
  check_param(w3, "w3", {C, C}, u);
  check_param(b3, "b3", {C}, u);
}

// channels_last u: the depthwise tile loads read an NCHW copy (coalesced; one extra read+write of u) unless
// SEGNEXT_MSCA_CUDA_CL_DIRECT=1, in which case they read u in place (each 32-byte sector then reaches the SM several
// times, once per channel group). Measure both with bench/msca_quick.py.
bool use_nchw_copy(const at::Tensor& u) {
  return u.size(1) > 1 && !u.is_contiguous() && u.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         env_int("SEGNEXT_MSCA_CUDA_CL_DIRECT", 0) == 0;
}

at::Tensor msca_forward_cuda(const at::Tensor& u, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& ws,
                             const at::Tensor& bs, const at::Tensor& w3, const at::Tensor& b3) {
  check_u(u);
  check_params(u, w0, b0, ws, bs, w3, b3);
  const DeviceGuard guard(u.device());
  at::Tensor out = at::empty_like(u);  // u's memory format when u is dense, else contiguous
  const bool do_poison = poison_enabled();
  if (do_poison) poison(out);
  if (out.numel() == 0) return out;

  const at::Tensor u_dw = use_nchw_copy(u) ? u.contiguous() : u;
  MscaFwdParams p{};
  p.u = u.data_ptr();
  p.u_dw = u_dw.data_ptr();
  p.udw_sB = u_dw.stride(0); p.udw_sC = u_dw.stride(1); p.udw_sH = u_dw.stride(2); p.udw_sW = u_dw.stride(3);
  p.out = out.data_ptr();
  p.w0 = w0.data_ptr<float>(); p.b0 = b0.data_ptr<float>();
  p.ws = ws.data_ptr<float>(); p.bs = bs.data_ptr<float>();
  p.w3 = w3.data_ptr<float>(); p.b3 = b3.data_ptr<float>();
  p.B = u.size(0); p.C = u.size(1); p.H = u.size(2); p.W = u.size(3);
  p.u_sB = u.stride(0); p.u_sC = u.stride(1); p.u_sH = u.stride(2); p.u_sW = u.stride(3);
  p.o_sB = out.stride(0); p.o_sC = out.stride(1); p.o_sH = out.stride(2); p.o_sW = out.stride(3);
  p.dtype = dtype_code(u);
  p.allow_tf32 = at::globalContext().allowTF32CuBLAS() ? 1 : 0;  // torch.backends.cuda.matmul.allow_tf32
  p.tile_cfg = env_int("SEGNEXT_MSCA_CUDA_TILE", -1);
  p.dw_variant = dw_variant_from_env();
  p.smem_limit = smem_limit_of_device(u);

  const MscaFwdPlan plan = msca_fwd_plan(p);
  TORCH_CHECK(plan.ok, "msca_forward (cuda backend): ", plan.error);
  at::Tensor workspace = at::empty({(int64_t)plan.workspace_bytes}, u.options().dtype(at::kByte));
  if (do_poison) poison(workspace);
  p.workspace = workspace.data_ptr();
  try {
    msca_fwd_launch(p, current_stream());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "msca_forward (cuda backend): ", e.what());
  }
  check_launch("msca_forward");
  return out;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads msca_backward_cuda(const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& w0, const at::Tensor& b0,
                         const at::Tensor& ws, const at::Tensor& bs, const at::Tensor& w3, const at::Tensor& b3,
                         std::array<bool, 7> needs) {
  check_u(u);
  check_params(u, w0, b0, ws, bs, w3, b3);
  TORCH_CHECK(grad_out.device() == u.device(), "grad_out: expected a tensor on ", u.device(), ", got ",
              grad_out.device());
  TORCH_CHECK(grad_out.scalar_type() == u.scalar_type(), "grad_out: expected dtype ", u.scalar_type(),
              " (the dtype of u), got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.sizes() == u.sizes(), "grad_out: expected shape ", u.sizes(), ", got ", grad_out.sizes());
  const DeviceGuard guard(u.device());
  const int64_t C = u.size(1);
  const bool need_du = needs[0];
  const bool need_dwdw = needs[1] || needs[2] || needs[3] || needs[4];
  const bool need_w3 = needs[5] || needs[6];
  const bool empty = u.numel() == 0;
  const bool do_poison = poison_enabled();
  auto fopt = u.options().dtype(at::kFloat);
  // Gradients of a group that is not needed come back as empty tensors (the Python wrapper returns None for them).
  auto wgrad = [&](bool need, at::IntArrayRef shape) {
    if (!need) return at::empty({0}, fopt);
    at::Tensor t = empty ? at::zeros(shape, fopt) : at::empty(shape, fopt);
    if (do_poison && !empty) poison(t);
    return t;
  };
  at::Tensor du = need_du ? at::empty_like(u) : at::empty({0}, u.options());
  if (do_poison && need_du) poison(du);
  at::Tensor dw0 = wgrad(need_dwdw, {C, 25}), db0 = wgrad(need_dwdw, {C});
  at::Tensor dws = wgrad(need_dwdw, {C, 78}), dbs = wgrad(need_dwdw, {C, 6});
  at::Tensor dw3 = wgrad(need_w3, {C, C}), db3 = wgrad(need_w3, {C});
  if (empty || !(need_du || need_dwdw || need_w3)) return Grads(du, dw0, db0, dws, dbs, dw3, db3);

  const bool nchw_copy = use_nchw_copy(u);
  const at::Tensor u_dw = nchw_copy ? u.contiguous() : u;
  // with the NCHW copy, du is accumulated in an NCHW buffer too (the depthwise kernel's read-modify-write of du is
  // per channel) and copied into du's memory format at the end
  at::Tensor du_k = (need_du && nchw_copy) ? at::empty(u.sizes(), u.options()) : du;
  if (do_poison && need_du && nchw_copy) poison(du_k);
  MscaBwdParams p{};
  p.g = grad_out.data_ptr();
  p.u = u.data_ptr();
  p.u_dw = u_dw.data_ptr();
  p.udw_sB = u_dw.stride(0); p.udw_sC = u_dw.stride(1); p.udw_sH = u_dw.stride(2); p.udw_sW = u_dw.stride(3);
  p.w0 = w0.data_ptr<float>(); p.b0 = b0.data_ptr<float>();
  p.ws = ws.data_ptr<float>(); p.bs = bs.data_ptr<float>();
  p.w3 = w3.data_ptr<float>(); p.b3 = b3.data_ptr<float>();
  p.du = need_du ? du_k.data_ptr() : nullptr;
  p.dw0 = need_dwdw ? dw0.data_ptr<float>() : nullptr;
  p.db0 = need_dwdw ? db0.data_ptr<float>() : nullptr;
  p.dws = need_dwdw ? dws.data_ptr<float>() : nullptr;
  p.dbs = need_dwdw ? dbs.data_ptr<float>() : nullptr;
  p.dw3 = need_w3 ? dw3.data_ptr<float>() : nullptr;
  p.db3 = need_w3 ? db3.data_ptr<float>() : nullptr;
  p.B = u.size(0); p.C = C; p.H = u.size(2); p.W = u.size(3);
  p.u_sB = u.stride(0); p.u_sC = u.stride(1); p.u_sH = u.stride(2); p.u_sW = u.stride(3);
  p.g_sB = grad_out.stride(0); p.g_sC = grad_out.stride(1); p.g_sH = grad_out.stride(2); p.g_sW = grad_out.stride(3);
  if (need_du) {
    p.du_sB = du_k.stride(0); p.du_sC = du_k.stride(1); p.du_sH = du_k.stride(2); p.du_sW = du_k.stride(3);
  }
  p.dtype = dtype_code(u);
  p.allow_tf32 = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  p.deterministic = at::globalContext().deterministicAlgorithms() ? 1 : 0;
  p.need_du = need_du; p.need_dwdw = need_dwdw; p.need_w3 = need_w3;
  p.tile_cfg = env_int("SEGNEXT_MSCA_CUDA_TILE_BWD", -1);
  p.dw_variant = dw_variant_from_env();
  p.smem_limit = smem_limit_of_device(u);

  const MscaBwdPlan plan = msca_bwd_plan(p);
  TORCH_CHECK(plan.ok, "msca_backward (cuda backend): ", plan.error);
  at::Tensor workspace = at::empty({(int64_t)plan.workspace_bytes}, u.options().dtype(at::kByte));
  if (do_poison) poison(workspace);
  p.workspace = workspace.data_ptr();
  try {
    msca_bwd_launch(p, current_stream());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "msca_backward (cuda backend): ", e.what());
  }
  check_launch("msca_backward");
  if (need_du && nchw_copy) du.copy_(du_k);
  return Grads(du, dw0, db0, dws, dbs, dw3, db3);
}

// ------------------------------------------------------------------------------------------------------------------
// NMF2D launchers (csrc/nmf_params.h). Internal entry points of the "cuda" NMF2D backend, called by
// segnext_kernels/nmf_cuda.py from inside the custom ops segnext_kernels::nmf2d_forward / nmf2d_backward (which own
// the fakes and the autograd registration), with buffers allocated by segnext_kernels/nmf_driver.py. They check
// devices, dtypes, shapes and contiguity (a mismatch is a bug in the driver, reported instead of a wrong answer).
// ------------------------------------------------------------------------------------------------------------------
using OptT = std::optional<at::Tensor>;

int nmf_dtype_code(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return NMF_F32;
    case at::kHalf: return NMF_F16;
    case at::kBFloat16: return NMF_BF16;
    default:
      TORCH_CHECK(false, name, ": the cuda NMF2D backend supports float32, float16 and bfloat16, got ", x.scalar_type(),
                  " (use backend='triton' or 'reference' for other dtypes)");
  }
  return -1;
}

void nmf_check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(on_kernel_device(x), name, ": expected a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 3, name, ": expected a 3-D tensor (B, D, N), got shape ", x.sizes());
  nmf_dtype_code(x, name);
}

// fp32, contiguous, on `like`'s device, with `numel` elements (shape checked by element count: the driver passes
// views of histories such as (K+1, B, D, R)[k]).
const float* nmf_small(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t numel) {
  TORCH_CHECK(t.device() == like.device(), name, ": expected a tensor on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(t.numel() == numel, name, ": expected ", numel, " elements, got shape ", t.sizes());
  return t.data_ptr<float>();
}
float* nmf_small_mut(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t numel) {
  return const_cast<float*>(nmf_small(t, name, like, numel));
}
const float* nmf_opt(const OptT& t, const char* name, const at::Tensor& like, int64_t numel, bool needed) {
  if (!needed) return nullptr;
  TORCH_CHECK(t.has_value(), name, ": required by this launch but not given");
  return nmf_small(*t, name, like, numel);
}
float* nmf_opt_mut(const OptT& t, const char* name, const at::Tensor& like, int64_t numel, bool needed) {
  return const_cast<float*>(nmf_opt(t, name, like, numel, needed));
}

int nmf_rp(int R) {
  int rp = 16;
  while (rp < R) rp *= 2;
  return rp;
}

// (RP, BN, T, P, work_floats) of nmf_make_geom for a problem on the current device.
std::vector<int64_t> nmf_geom(int64_t B, int64_t D, int64_t N, int64_t R, const at::Tensor& x, bool backward) {
  nmf_check_x(x, "x");
  TORCH_CHECK(R >= 1, "R: expected R >= 1, got ", R);
  const DeviceGuard guard(x.device());
  NmfGeom g{};
  try {
    g = nmf_make_geom(B, D, N, (int)R, nmf_dtype_code(x, "x"), backward ? 1 : 0, num_sms_of_device(x));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "nmf2d (cuda backend): ", e.what());
  }
  return {g.RP, g.BN, g.T, g.P, (int64_t)g.work_floats};
}

void nmf_bases(const at::Tensor& bin, const OptT& bout, const at::Tensor& G, const OptT& pxc, const OptT& pcc,
               const OptT& E, const OptT& H, const OptT& work, double eps, int64_t P, int64_t work_floats,
               bool update, bool store_eh) {
  TORCH_CHECK(on_kernel_device(bin) && bin.dim() == 3, "bases: expected a 3-D CUDA tensor (B, D, R), got ",
              bin.sizes());
  const int64_t B = bin.size(0), D = bin.size(1), R = bin.size(2);
  const int RP = nmf_rp((int)R);
  const DeviceGuard guard(bin.device());
  NmfBasesParams p{};
  p.bin = nmf_small(bin, "bases", bin, B * D * R);
  p.bout = nmf_opt_mut(bout, "bases_out", bin, B * D * R, update);
  p.G = nmf_small_mut(G, "G", bin, B * RP * RP);
  p.pxc = nmf_opt(pxc, "pxc", bin, B * P * D * RP, update);
  p.pcc = nmf_opt(pcc, "pcc", bin, B * P * RP * RP, update);
  p.E = nmf_opt_mut(E, "E", bin, B * D * R, update && store_eh);
  p.H = nmf_opt_mut(H, "H", bin, B * RP * RP, update && store_eh);
  p.work = nmf_opt_mut(work, "work", bin, work_floats, update && work_floats > 0);
  p.B = B; p.D = D; p.R = (int)R; p.RP = RP; p.P = (int)P;
  p.eps = (float)eps;
  p.update = update; p.store_eh = store_eh;
  try {
    nmf_bases_launch(p, current_stream());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "nmf2d bases update (cuda backend): ", e.what());
  }
  check_launch("nmf2d bases update");
}

void nmf_coef(const at::Tensor& x, const at::Tensor& bases, const at::Tensor& G, const OptT& cin,
              const at::Tensor& cout, const OptT& c0, const OptT& pxc, const OptT& pcc, const OptT& y, double eps,
              double inv_t, int64_t P, int64_t BN, bool init, bool store_c0, bool accum, bool recon) {
  nmf_check_x(x, "x");
  const int64_t B = x.size(0), D = x.size(1), N = x.size(2), R = bases.size(-1);
  const int RP = nmf_rp((int)R);
  const DeviceGuard guard(x.device());
  NmfCoefParams p{};
  p.x = x.data_ptr();
  p.x_sB = x.stride(0); p.x_sD = x.stride(1); p.x_sN = x.stride(2);
  p.bases = nmf_small(bases, "bases", x, B * D * R);
  p.G = nmf_small(G, "G", x, B * RP * RP);
  p.cin = nmf_opt(cin, "cin", x, B * N * R, !init);
  p.cout = nmf_small_mut(cout, "cout", x, B * N * R);
  p.c0 = nmf_opt_mut(c0, "c0", x, B * N * R, init && store_c0);
  p.pxc = nmf_opt_mut(pxc, "pxc", x, B * P * D * RP, accum);
  p.pcc = nmf_opt_mut(pcc, "pcc", x, B * P * RP * RP, accum);
  if (recon) {
    TORCH_CHECK(y.has_value(), "y: required by the reconstruction but not given");
    TORCH_CHECK(y->sizes() == x.sizes() && y->scalar_type() == x.scalar_type() && y->device() == x.device(),
                "y: expected a tensor like x ", x.sizes(), " ", x.scalar_type(), ", got ", y->sizes(), " ",
                y->scalar_type());
    p.y = y->data_ptr();
    p.y_sB = y->stride(0); p.y_sD = y->stride(1); p.y_sN = y->stride(2);
  }
  p.B = B; p.D = D; p.N = N; p.R = (int)R; p.RP = RP; p.P = (int)P; p.BN = (int)BN;
  p.eps = (float)eps; p.inv_t = (float)inv_t;
  p.dtype = nmf_dtype_code(x, "x");
  p.allow_tf32 = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  p.init = init; p.store_c0 = store_c0; p.accum = accum; p.recon = recon;
  try {
    nmf_coef_launch(p, current_stream());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "nmf2d coef pass (cuda backend): ", e.what());
  }
  check_launch("nmf2d coef pass");
}

void nmf_bwd_stage(const at::Tensor& x, const OptT& gy, const at::Tensor& bases, const OptT& ge,
                   const at::Tensor& cnew, const OptT& gcin, const OptT& S, const at::Tensor& cprev,
                   const at::Tensor& G, const OptT& gcout, const OptT& ga, const at::Tensor& pxg, const OptT& pgy,
                   const at::Tensor& pgg, double eps, double inv_t, int64_t P, int64_t BN, bool final_stage, bool init,
                   bool store_gc, bool store_ga) {
  nmf_check_x(x, "x");
  const int64_t B = x.size(0), D = x.size(1), N = x.size(2), R = bases.size(-1);
  const int RP = nmf_rp((int)R);
  const DeviceGuard guard(x.device());
  NmfBwdStageParams p{};
  p.x = x.data_ptr();
  p.x_sB = x.stride(0); p.x_sD = x.stride(1); p.x_sN = x.stride(2);
  const bool has_gy = final_stage && gy.has_value();
  if (has_gy) {
    TORCH_CHECK(gy->sizes() == x.sizes() && gy->scalar_type() == x.scalar_type() && gy->device() == x.device(),
                "grad_y: expected a tensor like x ", x.sizes(), " ", x.scalar_type(), ", got ", gy->sizes(), " ",
                gy->scalar_type());
    p.gy = gy->data_ptr();
    p.gy_sB = gy->stride(0); p.gy_sD = gy->stride(1); p.gy_sN = gy->stride(2);
  }
  p.bases = nmf_small(bases, "bases", x, B * D * R);
  p.ge = nmf_opt(ge, "ge", x, B * D * R, !final_stage);
  p.cnew = nmf_small(cnew, "cnew", x, B * N * R);
  p.gcin = nmf_opt(gcin, "gcin", x, B * N * R, gcin.has_value());
  p.S = nmf_opt(S, "S", x, B * RP * RP, !final_stage);
  p.cprev = nmf_small(cprev, "cprev", x, B * N * R);
  p.G = nmf_small(G, "G", x, B * RP * RP);
  p.gcout = nmf_opt_mut(gcout, "gcout", x, B * N * R, store_gc);
  p.ga = nmf_opt_mut(ga, "ga", x, B * N * R, store_ga);
  p.pxg = nmf_small_mut(pxg, "pxg", x, B * P * D * RP);
  p.pgy = nmf_opt_mut(pgy, "pgy", x, B * P * D * RP, has_gy);
  p.pgg = nmf_small_mut(pgg, "pgg", x, B * P * RP * RP);
  p.B = B; p.D = D; p.N = N; p.R = (int)R; p.RP = RP; p.P = (int)P; p.BN = (int)BN;
  p.eps = (float)eps; p.inv_t = (float)inv_t;
  p.dtype = nmf_dtype_code(x, "x");
  p.allow_tf32 = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  p.final_stage = final_stage; p.has_gy = has_gy; p.has_gcin = gcin.has_value(); p.init = init;
  p.store_gc = store_gc; p.store_ga = store_ga;
  try {
    nmf_bwd_stage_launch(p, current_stream());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "nmf2d backward stage (cuda backend): ", e.what());
  }
  check_launch("nmf2d backward stage");
}

void nmf_gx(const at::Tensor& l1, const at::Tensor& r1, int64_t m1, const OptT& l2, const OptT& r2, int64_t m2,
            const at::Tensor& gx) {
  nmf_check_x(gx, "grad_x");
  const int64_t B = gx.size(0), D = gx.size(1), N = gx.size(2), R = l1.size(-1);
  const DeviceGuard guard(gx.device());
  NmfGxParams p{};
  p.l1 = nmf_small(l1.narrow(0, 0, m1), "l1", gx, m1 * B * D * R);
  p.r1 = nmf_small(r1.narrow(0, 0, m1), "r1", gx, m1 * B * N * R);
  p.M1 = (int)m1;
  p.l2 = nmf_opt(l2, "l2", gx, m2 * B * D * R, m2 > 0);
  p.r2 = nmf_opt(r2, "r2", gx, m2 * B * N * R, m2 > 0);
  p.M2 = (int)m2;
  p.gx = gx.data_ptr();
  p.gx_sB = gx.stride(0); p.gx_sD = gx.stride(1); p.gx_sN = gx.stride(2);
  p.B = B; p.D = D; p.N = N; p.R = (int)R;
  p.dtype = nmf_dtype_code(gx, "grad_x");
  p.allow_tf32 = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  try {
    nmf_gx_launch(p, current_stream());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "nmf2d grad_x (cuda backend): ", e.what());
  }
  check_launch("nmf2d grad_x");
}

// Tile table for tuning scripts: list of (TH, TW, G, RV).
std::vector<std::vector<int64_t>> tile_table() {
  std::vector<std::vector<int64_t>> r;
  const MscaTileCfg* t = msca_tile_table();
  for (int i = 0; i < MSCA_NUM_TILE_CFGS; ++i) r.push_back({t[i].TH, t[i].TW, t[i].G, t[i].RV});
  return r;
}

}  // namespace

TORCH_LIBRARY(segnext, m) {
  m.set_python_module("segnext_kernels.msca_cuda");
  m.def("msca_forward(Tensor u, Tensor w0, Tensor b0, Tensor ws, Tensor bs, Tensor w3, Tensor b3) -> Tensor");
  m.def(
      "msca_backward(Tensor grad_out, Tensor u, Tensor w0, Tensor b0, Tensor ws, Tensor bs, Tensor w3, Tensor b3, "
      "bool[7] needs_input_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(segnext, SK_KERNEL_DEVICE, m) {
  m.impl("msca_forward", &msca_forward_cuda);
  m.impl("msca_backward", &msca_backward_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segnext-kernels CUDA extension: registers torch.ops.segnext.msca_forward / msca_backward and the NMF2D launchers";
  m.attr("__version__") = "0.1.0";
  m.def("tile_table", &tile_table, "Tile configurations (TH, TW, G, RV) of the MSCA kernels, index = tile config");
  // NMF2D launchers (internal: called by segnext_kernels/nmf_cuda.py, see nmf_params.h for their semantics)
  m.def("nmf_geom", &nmf_geom, "NMF2D geometry (RP, BN, T, P, work_floats)");
  m.def("nmf_bases", &nmf_bases, "NMF2D Gram matrix / bases update");
  m.def("nmf_coef", &nmf_coef, "NMF2D coef update pass over x");
  m.def("nmf_bwd_stage", &nmf_bwd_stage, "NMF2D backward of one coef update");
  m.def("nmf_gx", &nmf_gx, "NMF2D gradient of x");
}
