// C entry points of the CPU emulation of the CUDA MSCA kernels (tests/msca/test_msca_cuda_emu.py loads it with ctypes).
// Built with: g++ -std=c++17 -O1 -DSEGNEXT_EMU -shared -fPIC -Icsrc -Itests/helpers/emu -x c++ csrc/msca/msca_fwd.cu
//             -x c++ csrc/msca/msca_bwd.cu -x c++ tests/helpers/emu/emu_main.cpp
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "msca/msca_params.h"
#include "cuda_emu.h"

namespace {
struct AlignedBuf {
  void* p = nullptr;
  explicit AlignedBuf(size_t n, unsigned char fill) {
    if (n == 0) n = 256;
    p = std::aligned_alloc(256, (n + 255) / 256 * 256);
    std::memset(p, fill, n);  // 0xFF bytes read as NaN in every float type: catches unwritten workspace
  }
  ~AlignedBuf() { std::free(p); }
};
}  // namespace

// Scheduling order of the emulated threads between barriers (0 ascending, 1 descending, 2 random): results that
// differ between orders reveal a missing __syncthreads().
extern "C" void emu_set_order(int order) { emu::S().order = order; }

// Whether the last forward / backward launch gave the tensor-core variant two U/H buffers per warp
// (MscaGeom::mma_off_x1).
static int g_last_dbuf = 0;
extern "C" int emu_last_dbuf() { return g_last_dbuf; }

// Channels the tensor-core depthwise variant redid with the direct taps since the last call (then reset to 0).
extern "C" long long emu_take_mma_direct_redos() {
  const long long n = emu::mma_direct_redos();
  emu::mma_direct_redos() = 0;
  return n;
}

// cfg_out: the tile config used, + 100 when the depthwise part ran on tensor cores. dw_variant: MscaDwVariant.
// u_dw / udws: the copy read by the depthwise tile loads (the binding passes an NCHW copy of a channels_last u);
// null means u itself. Strides: 4 int64 each. The params are filled as the binding fills them (msca_fwd_params).
extern "C" int emu_msca_fwd(int dtype, int allow_tf32, int tile_cfg, int dw_variant, int smem_limit, int64_t B,
                            int64_t C, int64_t H, int64_t W, const void* u, const int64_t* us, const void* u_dw,
                            const int64_t* udws, void* out, const int64_t* os, const float* w0, const float* b0,
                            const float* ws, const float* bs, const float* w3, const float* b3, int* cfg_out,
                            char* err, int errlen) {
  try {
    const int64_t sizes[4] = {B, C, H, W};
    MscaFwdParams p = msca_fwd_params(sizes, {u, us}, {u_dw, u_dw ? udws : nullptr}, {out, os},
                                      {w0, b0, ws, bs, w3, b3}, {dtype, allow_tf32, tile_cfg, dw_variant, smem_limit});
    MscaFwdPlan plan = msca_fwd_plan(p);
    if (!plan.ok) { snprintf(err, errlen, "%s", plan.error); return 1; }
    *cfg_out = plan.geom.cfg + 100 * plan.geom.dw_mma;
    g_last_dbuf = plan.geom.mma_off_x1 != 0;
    AlignedBuf wsb(plan.workspace_bytes, 0xFF);
    p.workspace = wsb.p;
    msca_fwd_launch(p, nullptr);
  } catch (const std::exception& e) {
    snprintf(err, errlen, "%s", e.what());
    return 2;
  }
  return 0;
}

// As emu_msca_fwd; du / dus: the gradient of u (null when need_du is 0), written with its strides; the deterministic
// flag is set (the kernels are deterministic either way).
extern "C" int emu_msca_bwd(int dtype, int allow_tf32, int tile_cfg, int dw_variant, int smem_limit, int64_t B,
                            int64_t C, int64_t H, int64_t W, const void* g, const int64_t* gs, const void* u,
                            const int64_t* us, const void* u_dw, const int64_t* udws, const float* w0,
                            const float* b0, const float* ws, const float* bs, const float* w3, const float* b3,
                            void* du, const int64_t* dus, float* dw0, float* db0, float* dws, float* dbs, float* dw3,
                            float* db3, int need_du, int need_dwdw, int need_w3, int* cfg_out, char* err,
                            int errlen) {
  try {
    const int64_t sizes[4] = {B, C, H, W};
    MscaBwdParams p = msca_bwd_params(sizes, {g, gs}, {u, us}, {u_dw, u_dw ? udws : nullptr}, {du, dus},
                                      {w0, b0, ws, bs, w3, b3}, {dw0, db0, dws, dbs, dw3, db3}, need_du, need_dwdw,
                                      need_w3, 1, {dtype, allow_tf32, tile_cfg, dw_variant, smem_limit});
    MscaBwdPlan plan = msca_bwd_plan(p);
    if (!plan.ok) { snprintf(err, errlen, "%s", plan.error); return 1; }
    *cfg_out = plan.mix_geom.cfg + 100 * plan.mix_geom.dw_mma;
    g_last_dbuf = plan.mix_geom.mma_off_x1 != 0;
    AlignedBuf wsb(plan.workspace_bytes, 0xFF);
    p.workspace = wsb.p;
    msca_bwd_launch(p, nullptr);
  } catch (const std::exception& e) {
    snprintf(err, errlen, "%s", e.what());
    return 2;
  }
  return 0;
}
