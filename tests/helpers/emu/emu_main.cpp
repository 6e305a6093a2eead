// C entry points of the CPU emulation library (tests/msca/test_msca_cuda_emu.py loads it with ctypes).
// Built with: g++ -std=c++17 -O1 -DSEGNEXT_EMU -shared -fPIC -x c++ csrc/msca_fwd.cu csrc/msca_bwd.cu tests/helpers/emu/emu_main.cpp
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "msca_params.h"
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

// Whether the last forward / backward launch gave the tensor-core variant two U/H buffers per warp (MscaGeom::tc_off_x1).
static int g_last_dbuf = 0;
extern "C" int emu_last_dbuf() { return g_last_dbuf; }

// Channels the tensor-core depthwise variant redid with the direct taps since the last call (then reset to 0).
extern "C" long long emu_take_tc_direct_redos() {
  const long long n = emu::tc_direct_redos();
  emu::tc_direct_redos() = 0;
  return n;
}

// cfg_out: the tile config used, + 100 when the depthwise part ran on tensor cores. dw_variant: MscaDwVariant.
// u_dw / udws: the copy read by the depthwise tile loads (the binding passes an NCHW copy of a channels_last u);
// null means u itself.
extern "C" int emu_msca_fwd(int dtype, int allow_tf32, int tile_cfg, int dw_variant, int smem_limit, long long B, long long C,
                            long long H, long long W, const void* u, const long long* us, const void* u_dw,
                            const long long* udws, void* out,
                            const long long* os, const float* w0, const float* b0, const float* ws, const float* bs,
                            const float* w3, const float* b3, int* cfg_out, char* err, int errlen) {
  try {
    MscaFwdParams p{};
    p.u = u; p.u_dw = u_dw ? u_dw : u; p.out = out; p.w0 = w0; p.b0 = b0; p.ws = ws; p.bs = bs; p.w3 = w3; p.b3 = b3;
    p.B = B; p.C = C; p.H = H; p.W = W;
    p.u_sB = us[0]; p.u_sC = us[1]; p.u_sH = us[2]; p.u_sW = us[3];
    const long long* ds = u_dw ? udws : us;
    p.udw_sB = ds[0]; p.udw_sC = ds[1]; p.udw_sH = ds[2]; p.udw_sW = ds[3];
    p.o_sB = os[0]; p.o_sC = os[1]; p.o_sH = os[2]; p.o_sW = os[3];
    p.dtype = dtype; p.allow_tf32 = allow_tf32; p.tile_cfg = tile_cfg; p.dw_variant = dw_variant;
    p.smem_limit = smem_limit;
    MscaFwdPlan plan = msca_fwd_plan(p);
    if (!plan.ok) { snprintf(err, errlen, "%s", plan.error); return 1; }
    *cfg_out = plan.geom.cfg + 100 * plan.geom.tc;
    g_last_dbuf = plan.geom.tc_off_x1 != 0;
    AlignedBuf wsb(plan.workspace_bytes, 0xFF);
    p.workspace = wsb.p;
    msca_fwd_launch(p, nullptr);
  } catch (const std::exception& e) {
    snprintf(err, errlen, "%s", e.what());
    return 2;
  }
  return 0;
}

extern "C" int emu_msca_bwd(int dtype, int allow_tf32, int tile_cfg, int dw_variant, int smem_limit, long long B, long long C,
                            long long H, long long W, const void* g, const long long* gs, const void* u,
                            const long long* us, const void* u_dw, const long long* udws, const float* w0, const float* b0, const float* ws, const float* bs,
                            const float* w3, const float* b3, void* du, const long long* dus, float* dw0, float* db0,
                            float* dws, float* dbs, float* dw3, float* db3, int need_du, int need_dwdw, int need_w3,
                            int* cfg_out, char* err, int errlen) {
  try {
    MscaBwdParams p{};
    p.g = g; p.u = u; p.u_dw = u_dw ? u_dw : u; p.w0 = w0; p.b0 = b0; p.ws = ws; p.bs = bs; p.w3 = w3; p.b3 = b3;
    p.du = du; p.dw0 = dw0; p.db0 = db0; p.dws = dws; p.dbs = dbs; p.dw3 = dw3; p.db3 = db3;
    p.B = B; p.C = C; p.H = H; p.W = W;
    p.u_sB = us[0]; p.u_sC = us[1]; p.u_sH = us[2]; p.u_sW = us[3];
    const long long* ds = u_dw ? udws : us;
    p.udw_sB = ds[0]; p.udw_sC = ds[1]; p.udw_sH = ds[2]; p.udw_sW = ds[3];
    p.g_sB = gs[0]; p.g_sC = gs[1]; p.g_sH = gs[2]; p.g_sW = gs[3];
    p.du_sB = dus[0]; p.du_sC = dus[1]; p.du_sH = dus[2]; p.du_sW = dus[3];
    p.dtype = dtype; p.allow_tf32 = allow_tf32; p.deterministic = 1;
    p.need_du = need_du; p.need_dwdw = need_dwdw; p.need_w3 = need_w3;
    p.tile_cfg = tile_cfg; p.dw_variant = dw_variant; p.smem_limit = smem_limit;
    MscaBwdPlan plan = msca_bwd_plan(p);
    if (!plan.ok) { snprintf(err, errlen, "%s", plan.error); return 1; }
    *cfg_out = plan.geom1.cfg + 100 * plan.geom1.tc;
    g_last_dbuf = plan.geom1.tc_off_x1 != 0;
    AlignedBuf wsb(plan.workspace_bytes, 0xFF);
    p.workspace = wsb.p;
    msca_bwd_launch(p, nullptr);
  } catch (const std::exception& e) {
    snprintf(err, errlen, "%s", e.what());
    return 2;
  }
  return 0;
}
