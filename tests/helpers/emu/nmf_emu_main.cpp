// C entry points of the CPU emulation of the CUDA NMF2D kernels (tests/nmf/test_nmf_cuda_emu.py loads it with ctypes).
// Built with: g++ -std=c++17 -O1 -DSEGNEXT_EMU -shared -fPIC -Icsrc -Itests/helpers/emu -x c++ csrc/nmf/nmf_fwd.cu
//             -x c++ csrc/nmf/nmf_bwd.cu -x c++ tests/helpers/emu/nmf_emu_main.cpp
// Arguments travel as arrays (pointers, int64s, floats, ints) in the order documented at each entry point; the params
// are filled as the binding fills them (the nmf_*_params functions of nmf/nmf_params.h).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "nmf/nmf_common.cuh"

extern "C" void emu_nmf_set_order(int order) { emu::S().order = order; }
extern "C" void emu_nmf_set_smem_limit(int bytes) { nmf::emu_smem_limit() = bytes; }

#define NMF_TRY(...)                                    \
  try {                                                 \
    __VA_ARGS__;                                        \
  } catch (const std::exception& e) {                   \
    snprintf(err, errlen, "%s", e.what());              \
    return 1;                                           \
  }                                                     \
  return 0;

// out: RP, BN, T, P; work: work_floats; p_override, mtw_override: 0 (automatic) or forced (nmf_make_geom)
extern "C" int emu_nmf_geom(long long B, long long D, long long N, int R, int dtype, int backward, int num_sms,
                            int p_override, int mtw_override, int* out, long long* work, char* err, int errlen) {
  NMF_TRY({
    NmfGeom g = nmf_make_geom(B, D, N, R, dtype, backward, num_sms, p_override, mtw_override);
    out[0] = g.RP; out[1] = g.BN; out[2] = g.T; out[3] = g.P;
    *work = (long long)g.work_floats;
  })
}

// ptrs: bin, bout, G, pxc, pcc, E, H, work; ints: B, D, R, RP, P, update, store_eh; fl: eps
extern "C" int emu_nmf_bases(void** ptrs, const int64_t* ints, const float* fl, char* err, int errlen) {
  NMF_TRY({
    const NmfBasesParams p = nmf_bases_params(
        (const float*)ptrs[0], (float*)ptrs[1], (float*)ptrs[2], (const float*)ptrs[3], (const float*)ptrs[4],
        (float*)ptrs[5], (float*)ptrs[6], (float*)ptrs[7], ints[0], ints[1], (int)ints[2], (int)ints[3],
        (int)ints[4], fl[0], (int)ints[5], (int)ints[6]);
    nmf_bases_launch(p, nullptr);
  })
}

// ptrs: x, bases, G, cin, cout, c0, pxc, pcc, y
// ints: x_sB, x_sD, x_sN, y_sB, y_sD, y_sN, B, D, N, R, RP, P, BN, dtype, allow_tf32, init, store_c0, accum, recon
// fl: eps, inv_t
extern "C" int emu_nmf_coef(void** ptrs, const int64_t* ints, const float* fl, char* err, int errlen) {
  NMF_TRY({
    const int64_t* s = ints;
    const NmfPassShape shape{s[6], s[7], s[8], (int)s[9], (int)s[10], (int)s[11], (int)s[12]};
    const NmfCoefParams p = nmf_coef_params(
        {ptrs[0], s + 0}, (const float*)ptrs[1], (const float*)ptrs[2], (const float*)ptrs[3], (float*)ptrs[4],
        (float*)ptrs[5], (float*)ptrs[6], (float*)ptrs[7], {ptrs[8], s + 3}, shape, fl[0], fl[1], (int)s[13],
        (int)s[14], (int)s[15], (int)s[16], (int)s[17], (int)s[18]);
    nmf_coef_launch(p, nullptr);
  })
}

// ptrs: x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg
// ints: x_sB, x_sD, x_sN, gy_sB, gy_sD, gy_sN, B, D, N, R, RP, P, BN, dtype, allow_tf32,
//       final, has_gy, has_gcin, init, store_gc, store_ga
// fl: eps, inv_t
extern "C" int emu_nmf_bwd(void** ptrs, const int64_t* ints, const float* fl, char* err, int errlen) {
  NMF_TRY({
    const int64_t* s = ints;
    const NmfPassShape shape{s[6], s[7], s[8], (int)s[9], (int)s[10], (int)s[11], (int)s[12]};
    const NmfBwdStageParams p = nmf_bwd_stage_params(
        {ptrs[0], s + 0}, {ptrs[1], s + 3}, (const float*)ptrs[2], (const float*)ptrs[3], (const float*)ptrs[4],
        (const float*)ptrs[5], (const float*)ptrs[6], (const float*)ptrs[7], (const float*)ptrs[8], (float*)ptrs[9],
        (float*)ptrs[10], (float*)ptrs[11], (float*)ptrs[12], (float*)ptrs[13], shape, fl[0], fl[1], (int)s[13],
        (int)s[14], (int)s[15], (int)s[16], (int)s[17], (int)s[18], (int)s[19], (int)s[20]);
    nmf_bwd_stage_launch(p, nullptr);
  })
}

// ptrs: l1, r1, l2, r2, gx; ints: M1, M2, gx_sB, gx_sD, gx_sN, B, D, N, R, dtype, allow_tf32
extern "C" int emu_nmf_gx(void** ptrs, const int64_t* ints, char* err, int errlen) {
  NMF_TRY({
    const NmfGxParams p = nmf_gx_params((const float*)ptrs[0], (const float*)ptrs[1], (int)ints[0],
                                        (const float*)ptrs[2], (const float*)ptrs[3], (int)ints[1], {ptrs[4], ints + 2},
                                        ints[5], ints[6], ints[7], (int)ints[8], (int)ints[9], (int)ints[10]);
    nmf_gx_launch(p, nullptr);
  })
}
