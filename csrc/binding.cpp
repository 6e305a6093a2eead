// PyTorch binding of the hand-written CUDA kernels (MSCA and NMF2D): the only file that includes <torch/extension.h>,
// and the one binding of the CUDA extension. Plain pybind11 functions, no torch.library registration: the package's
// Python custom ops (torch.library.custom_op, with their fakes and autograd) are the only op layer and call these.
//
//   msca_forward(u, w0, b0, ws, bs, w3, b3, *, tile_cfg=-1, dw_variant=MSCA_DW_AUTO, cl_direct=False,
//                poison=False) -> Tensor
//   msca_backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs: list of 7 bools, *, tile_cfg=-1,
//                 dw_variant=MSCA_DW_AUTO, cl_direct=False, poison=False) -> list of 7 Tensors
//       (du, dw0, db0, dws, dbs, dw3, db3; a gradient whose group is not needed comes back as an empty tensor)
//   tile_table() -> list of (TH, TW, G, RV)
//   nmf_geom(B, D, N, R, x, backward, p_override=0, mtw_override=0) / nmf_bases / nmf_coef / nmf_bwd_stage / nmf_gx:
//       the NMF2D launchers (see the NMF2D section below)
//
// Nothing here reads the environment: the tuning and test knobs are arguments, which the Python backends
// (segnext_kernels/msca/cuda.py, nmf/cuda.py) fill from segnext_kernels.knobs.KNOBS (read once at import):
//   tile_cfg        -1 (automatic) or a tile configuration to force (0..5, see msca/msca_fwd.cu); the forward's and
//                   the backward mix kernel's are separate knobs
//   dw_variant      MscaDwVariant (msca/msca_params.h): the depthwise part of the forward and of the backward's
//                   recompute on tensor cores (MSCA_DW_MMA: msca/msca_depthwise_mma.cuh, fp16/bf16) or fp32 FMA
//                   (MSCA_DW_FMA), or MSCA_DW_AUTO; a forward and its backward must be given the same one
//   cl_direct       channels_last u: tile loads read u in place (no NCHW copy)
//   poison          fill outputs and workspace with NaN before the launch (tests)
//   p_override, mtw_override  (nmf_geom) 0, or force the CTAs per sample / the forward's tile width (1 or 2)
//
// Built with -DSEGNEXT_EMU (g++ only, CPU torch; tests/helpers/emu_build.py, module segnext_kernels_cuda_emu), the
// same functions take CPU tensors and the kernels run in the CPU emulation of tests/helpers/emu/cuda_emu.h: the
// device-runtime calls below (device guard, stream, device attributes, launch-error check) are the only lines that
// differ.
#include <torch/extension.h>

#ifndef SEGNEXT_EMU
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <cuda_runtime_api.h>

#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "msca/msca_params.h"
#include "nmf/nmf_params.h"

namespace {

// ---- the device runtime (CUDA; or the CPU emulation) ----------------------------------------------------------------
#ifdef SEGNEXT_EMU
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
cudaStream_t current_stream() { return nullptr; }
int smem_limit_of_device(const at::Tensor&) { return 232448; }  // as an H100 (opt-in shared memory per block)
int num_sms_of_device(const at::Tensor&) { return 132; }         // as an H100 SXM
void check_launch(const char*) {}                                // the emulation throws instead
#else
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

// torch.backends.cuda.matmul.allow_tf32
int allow_tf32() { return at::globalContext().allowTF32CuBLAS() ? 1 : 0; }

void check_dw_variant(int64_t dw_variant) {
  TORCH_CHECK(dw_variant == MSCA_DW_AUTO || dw_variant == MSCA_DW_MMA || dw_variant == MSCA_DW_FMA,
              "dw_variant: expected ", (int)MSCA_DW_AUTO, " (auto), ", (int)MSCA_DW_MMA, " (tensor cores) or ",
              (int)MSCA_DW_FMA, " (fp32 FMA), got ", dw_variant);
}

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
// cl_direct, in which case they read u in place (each 32-byte sector then reaches the SM several times, once per
// channel group). Measure both on a GPU (bench/msca.py).
bool use_nchw_copy(const at::Tensor& u, bool cl_direct) {
  return u.size(1) > 1 && !u.is_contiguous() && u.is_contiguous(at::MemoryFormat::ChannelsLast) && !cl_direct;
}

MscaTensorArg tensor_arg(const at::Tensor& t) { return {t.data_ptr(), t.strides().data()}; }

MscaWeights weights_of(const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& ws, const at::Tensor& bs,
                       const at::Tensor& w3, const at::Tensor& b3) {
  return {w0.data_ptr<float>(), b0.data_ptr<float>(), ws.data_ptr<float>(), bs.data_ptr<float>(),
          w3.data_ptr<float>(), b3.data_ptr<float>()};
}

// tile_cfg: -1 (automatic) or the tile configuration to force (the forward's, or the backward's mix kernel's).
MscaLaunchOptions launch_options(const at::Tensor& u, int64_t tile_cfg, int64_t dw_variant) {
  MscaLaunchOptions o{};
  o.dtype = dtype_code(u);
  o.allow_tf32 = allow_tf32();
  o.tile_cfg = (int)tile_cfg;
  o.dw_variant = (int)dw_variant;
  o.smem_limit = smem_limit_of_device(u);
  return o;
}

at::Tensor msca_forward(const at::Tensor& u, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& ws,
                        const at::Tensor& bs, const at::Tensor& w3, const at::Tensor& b3, int64_t tile_cfg,
                        int64_t dw_variant, bool cl_direct, bool do_poison) {
  check_u(u);
  check_params(u, w0, b0, ws, bs, w3, b3);
  check_dw_variant(dw_variant);
  const DeviceGuard guard(u.device());
  at::Tensor out = at::empty_like(u);  // u's memory format when u is dense, else contiguous
  if (do_poison) poison(out);
  if (out.numel() == 0) return out;

  const at::Tensor u_dw = use_nchw_copy(u, cl_direct) ? u.contiguous() : u;
  MscaFwdParams p = msca_fwd_params(u.sizes().data(), tensor_arg(u), tensor_arg(u_dw), tensor_arg(out),
                                    weights_of(w0, b0, ws, bs, w3, b3), launch_options(u, tile_cfg, dw_variant));
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

// needs: whether (u, w0, b0, ws, bs, w3, b3) need a gradient (7 bools). Returns the 7 gradients in that order; those of
// a group that is not needed come back as empty tensors (the Python side returns None for them). dw_variant: the
// forward's (the mix kernel recomputes s, which must be the s the forward computed).
std::vector<at::Tensor> msca_backward(const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& w0,
                                      const at::Tensor& b0, const at::Tensor& ws, const at::Tensor& bs,
                                      const at::Tensor& w3, const at::Tensor& b3, const std::vector<bool>& needs,
                                      int64_t tile_cfg, int64_t dw_variant, bool cl_direct, bool do_poison) {
  TORCH_CHECK(needs.size() == 7, "needs: expected 7 bools (u, w0, b0, ws, bs, w3, b3), got ", needs.size());
  check_u(u);
  check_params(u, w0, b0, ws, bs, w3, b3);
  check_dw_variant(dw_variant);
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
  auto fopt = u.options().dtype(at::kFloat);
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
  if (empty || !(need_du || need_dwdw || need_w3)) return {du, dw0, db0, dws, dbs, dw3, db3};

  const bool nchw_copy = use_nchw_copy(u, cl_direct);
  const at::Tensor u_dw = nchw_copy ? u.contiguous() : u;
  // with the NCHW copy, du is accumulated in an NCHW buffer too (the depthwise kernel's read-modify-write of du is
  // per channel) and copied into du's memory format at the end
  at::Tensor du_k = (need_du && nchw_copy) ? at::empty(u.sizes(), u.options()) : du;
  if (do_poison && need_du && nchw_copy) poison(du_k);
  auto fptr = [](bool need, const at::Tensor& t) { return need ? t.data_ptr<float>() : nullptr; };
  const MscaWeightGrads grads{fptr(need_dwdw, dw0), fptr(need_dwdw, db0), fptr(need_dwdw, dws),
                              fptr(need_dwdw, dbs), fptr(need_w3, dw3),   fptr(need_w3, db3)};
  MscaBwdParams p = msca_bwd_params(
      u.sizes().data(), tensor_arg(grad_out), tensor_arg(u), tensor_arg(u_dw),
      need_du ? tensor_arg(du_k) : MscaTensorArg{nullptr, nullptr}, weights_of(w0, b0, ws, bs, w3, b3), grads,
      need_du, need_dwdw, need_w3, at::globalContext().deterministicAlgorithms() ? 1 : 0,
      launch_options(u, tile_cfg, dw_variant));
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
  return {du, dw0, db0, dws, dbs, dw3, db3};
}

// ------------------------------------------------------------------------------------------------------------------
// NMF2D launchers (nmf/nmf_params.h). Internal entry points of the "cuda" NMF2D backend (segnext_kernels/nmf/cuda.py),
// called from inside the package's NMF2D custom ops (which own the fakes and the autograd registration), with buffers
// allocated by segnext_kernels/nmf/driver.py. They check devices, dtypes, shapes and contiguity (a mismatch is a bug
// in the driver, reported instead of a wrong answer).
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

NmfXArg nmf_x_arg(const at::Tensor& t) { return {t.data_ptr(), t.strides().data()}; }

int nmf_rp(int R) {
  int rp = 16;
  while (rp < R) rp *= 2;
  return rp;
}

// (RP, BN, T, P, work_floats) of nmf_make_geom for a problem on the current device; p_override / mtw_override: 0
// (automatic) or the CTAs per sample / the forward's tile width to force (nmf/nmf_params.h).
std::vector<int64_t> nmf_geom(int64_t B, int64_t D, int64_t N, int64_t R, const at::Tensor& x, bool backward,
                              int64_t p_override, int64_t mtw_override) {
  nmf_check_x(x, "x");
  TORCH_CHECK(R >= 1, "R: expected R >= 1, got ", R);
  const DeviceGuard guard(x.device());
  NmfGeom g{};
  try {
    g = nmf_make_geom(B, D, N, (int)R, nmf_dtype_code(x, "x"), backward ? 1 : 0, num_sms_of_device(x),
                      (int)p_override, (int)mtw_override);
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
  const float* bin_p = nmf_small(bin, "bases", bin, B * D * R);
  float* bout_p = nmf_opt_mut(bout, "bases_out", bin, B * D * R, update);
  float* G_p = nmf_small_mut(G, "G", bin, B * RP * RP);
  const float* pxc_p = nmf_opt(pxc, "pxc", bin, B * P * D * RP, update);
  const float* pcc_p = nmf_opt(pcc, "pcc", bin, B * P * RP * RP, update);
  float* E_p = nmf_opt_mut(E, "E", bin, B * D * R, update && store_eh);
  float* H_p = nmf_opt_mut(H, "H", bin, B * RP * RP, update && store_eh);
  float* work_p = nmf_opt_mut(work, "work", bin, work_floats, update && work_floats > 0);
  const NmfBasesParams p = nmf_bases_params(bin_p, bout_p, G_p, pxc_p, pcc_p, E_p, H_p, work_p, B, D, (int)R, RP,
                                            (int)P, (float)eps, update, store_eh);
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
  const float* bases_p = nmf_small(bases, "bases", x, B * D * R);
  const float* G_p = nmf_small(G, "G", x, B * RP * RP);
  const float* cin_p = nmf_opt(cin, "cin", x, B * N * R, !init);
  float* cout_p = nmf_small_mut(cout, "cout", x, B * N * R);
  float* c0_p = nmf_opt_mut(c0, "c0", x, B * N * R, init && store_c0);
  float* pxc_p = nmf_opt_mut(pxc, "pxc", x, B * P * D * RP, accum);
  float* pcc_p = nmf_opt_mut(pcc, "pcc", x, B * P * RP * RP, accum);
  NmfXArg y_arg{nullptr, nullptr};
  if (recon) {
    TORCH_CHECK(y.has_value(), "y: required by the reconstruction but not given");
    TORCH_CHECK(y->sizes() == x.sizes() && y->scalar_type() == x.scalar_type() && y->device() == x.device(),
                "y: expected a tensor like x ", x.sizes(), " ", x.scalar_type(), ", got ", y->sizes(), " ",
                y->scalar_type());
    y_arg = nmf_x_arg(*y);
  }
  const NmfPassShape shape{B, D, N, (int)R, RP, (int)P, (int)BN};
  const NmfCoefParams p = nmf_coef_params(nmf_x_arg(x), bases_p, G_p, cin_p, cout_p, c0_p, pxc_p, pcc_p, y_arg, shape,
                                          (float)eps, (float)inv_t, nmf_dtype_code(x, "x"), allow_tf32(), init,
                                          store_c0, accum, recon);
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
  const bool has_gy = final_stage && gy.has_value();
  NmfXArg gy_arg{nullptr, nullptr};
  if (has_gy) {
    TORCH_CHECK(gy->sizes() == x.sizes() && gy->scalar_type() == x.scalar_type() && gy->device() == x.device(),
                "grad_y: expected a tensor like x ", x.sizes(), " ", x.scalar_type(), ", got ", gy->sizes(), " ",
                gy->scalar_type());
    gy_arg = nmf_x_arg(*gy);
  }
  const float* bases_p = nmf_small(bases, "bases", x, B * D * R);
  const float* ge_p = nmf_opt(ge, "ge", x, B * D * R, !final_stage);
  const float* cnew_p = nmf_small(cnew, "cnew", x, B * N * R);
  const float* gcin_p = nmf_opt(gcin, "gcin", x, B * N * R, gcin.has_value());
  const float* S_p = nmf_opt(S, "S", x, B * RP * RP, !final_stage);
  const float* cprev_p = nmf_small(cprev, "cprev", x, B * N * R);
  const float* G_p = nmf_small(G, "G", x, B * RP * RP);
  float* gcout_p = nmf_opt_mut(gcout, "gcout", x, B * N * R, store_gc);
  float* ga_p = nmf_opt_mut(ga, "ga", x, B * N * R, store_ga);
  float* pxg_p = nmf_small_mut(pxg, "pxg", x, B * P * D * RP);
  float* pgy_p = nmf_opt_mut(pgy, "pgy", x, B * P * D * RP, has_gy);
  float* pgg_p = nmf_small_mut(pgg, "pgg", x, B * P * RP * RP);
  const NmfPassShape shape{B, D, N, (int)R, RP, (int)P, (int)BN};
  const NmfBwdStageParams p = nmf_bwd_stage_params(
      nmf_x_arg(x), gy_arg, bases_p, ge_p, cnew_p, gcin_p, S_p, cprev_p, G_p, gcout_p, ga_p, pxg_p, pgy_p, pgg_p, shape,
      (float)eps, (float)inv_t, nmf_dtype_code(x, "x"), allow_tf32(), final_stage, has_gy, gcin.has_value(), init,
      store_gc, store_ga);
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
  const float* l1_p = nmf_small(l1.narrow(0, 0, m1), "l1", gx, m1 * B * D * R);
  const float* r1_p = nmf_small(r1.narrow(0, 0, m1), "r1", gx, m1 * B * N * R);
  const float* l2_p = nmf_opt(l2, "l2", gx, m2 * B * D * R, m2 > 0);
  const float* r2_p = nmf_opt(r2, "r2", gx, m2 * B * N * R, m2 > 0);
  const NmfGxParams p = nmf_gx_params(l1_p, r1_p, (int)m1, l2_p, r2_p, (int)m2, nmf_x_arg(gx), B, D, N, (int)R,
                                      nmf_dtype_code(gx, "grad_x"), allow_tf32());
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
  const MscaTileConfig* t = msca_tile_table();
  for (int i = 0; i < MSCA_NUM_TILE_CFGS; ++i) r.push_back({t[i].TH, t[i].TW, t[i].G, t[i].RV});
  return r;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segnext-kernels CUDA extension: the MSCA and NMF2D launchers (plain functions; the op layer is Python)";
  m.attr("__version__") = "0.1.0";
  m.def("msca_forward", &msca_forward, "MSCA forward: out = msca(u) with packed weights", py::arg("u"), py::arg("w0"),
        py::arg("b0"), py::arg("ws"), py::arg("bs"), py::arg("w3"), py::arg("b3"), py::kw_only(),
        py::arg("tile_cfg") = -1, py::arg("dw_variant") = (int64_t)MSCA_DW_AUTO, py::arg("cl_direct") = false,
        py::arg("poison") = false);
  m.def("msca_backward", &msca_backward,
        "MSCA backward: [du, dw0, db0, dws, dbs, dw3, db3] (empty tensors where needs is false for the group)",
        py::arg("grad_out"), py::arg("u"), py::arg("w0"), py::arg("b0"), py::arg("ws"), py::arg("bs"), py::arg("w3"),
        py::arg("b3"), py::arg("needs"), py::kw_only(), py::arg("tile_cfg") = -1,
        py::arg("dw_variant") = (int64_t)MSCA_DW_AUTO, py::arg("cl_direct") = false, py::arg("poison") = false);
  m.def("tile_table", &tile_table, "Tile configurations (TH, TW, G, RV) of the MSCA kernels, index = tile config");
  // NMF2D launchers (internal: called by the package's NMF2D cuda backend, see nmf/nmf_params.h for their semantics)
  m.def("nmf_geom", &nmf_geom, "NMF2D geometry (RP, BN, T, P, work_floats)", py::arg("B"), py::arg("D"), py::arg("N"),
        py::arg("R"), py::arg("x"), py::arg("backward"), py::arg("p_override") = 0, py::arg("mtw_override") = 0);
  m.def("nmf_bases", &nmf_bases, "NMF2D Gram matrix / bases update");
  m.def("nmf_coef", &nmf_coef, "NMF2D coef update pass over x");
  m.def("nmf_bwd_stage", &nmf_bwd_stage, "NMF2D backward of one coef update");
  m.def("nmf_gx", &nmf_gx, "NMF2D gradient of x");
}
