// Device building blocks shared by every kernel of the extension (MSCA and NMF): the emulation switch, launch
// macros, dtype helpers, tensor-core wrappers (mma.sync, ldmatrix) and warp reductions.
//
// Compiled by nvcc for the GPU, and by g++ with -DSEGNEXT_EMU for the CPU emulation tests (tests/helpers/emu/cuda_emu.h),
// which replace the few inline-PTX wrappers below by emulations with the documented fragment layouts.
#pragma once

#ifdef SEGNEXT_EMU
#include "cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#ifdef SEGNEXT_EMU
#define SK_DYN_SMEM(name) unsigned char* name = ::emu::dyn_smem()
#define SK_LAUNCH(kernel, grid, block, smem, stream, ...) ::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define SK_SET_SMEM_ATTR(kernel, bytes) ((void)0)
#else
#define SK_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define SK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define SK_SET_SMEM_ATTR(kernel, bytes) \
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(bytes))
#endif

#define SK_DEV __device__ __forceinline__

namespace sk {

// ------------------------------------------------------------------------------------------------------------------
// Types. T: a tensor dtype (float, __half, __nv_bfloat16); arithmetic is always fp32.
// ------------------------------------------------------------------------------------------------------------------
SK_DEV float to_f(float x) { return x; }
SK_DEV float to_f(__half x) { return __half2float(x); }
SK_DEV float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> SK_DEV T from_f(float x);
template <> SK_DEV float from_f<float>(float x) { return x; }
template <> SK_DEV __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> SK_DEV __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> struct IsBF16 { static constexpr bool value = false; };
template <> struct IsBF16<__nv_bfloat16> { static constexpr bool value = true; };

SK_DEV uint32_t f32_to_tf32(float x) {
#ifdef SEGNEXT_EMU
  return ::emu::cvt_rna_tf32(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#endif
}
SK_DEV float tf32_round(float x) { return __uint_as_float(f32_to_tf32(x)); }

SK_DEV int lane_id() { return (int)(threadIdx.x & 31); }

// ------------------------------------------------------------------------------------------------------------------
// Tensor-core wrappers. Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k8"), g = lane/4,
// t = lane%4:
//   m16n8k16 (.f16/.bf16): a[0] = A[g][2t,2t+1], a[1] = A[g+8][2t,2t+1], a[2] = A[g][2t+8,+9], a[3] = A[g+8][2t+8,+9]
//                          b[0] = B[2t,2t+1][g], b[1] = B[2t+8,+9][g]          (lower k in the lower 16 bits)
//   m16n8k8 (.tf32):       a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]
//                          b[0] = B[t][g], b[1] = B[t+4][g]
//   D (f32, both):         d[0] = D[g][2t], d[1] = D[g][2t+1], d[2] = D[g+8][2t], d[3] = D[g+8][2t+1]
// ------------------------------------------------------------------------------------------------------------------
// d = a x b + c with the accumulator input c apart from d (c = a bias quad: the bias add costs no instruction).
template <bool BF16>
SK_DEV void mma_16816_c(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#ifdef SEGNEXT_EMU
  ::emu::mma_16816(d, a, b, c, BF16);
#else
  if (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#endif
}

// d += a x b
template <bool BF16>
SK_DEV void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  mma_16816_c<BF16>(d, a, b, d);
}

SK_DEV void mma_1688_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef SEGNEXT_EMU
  ::emu::mma_1688_tf32(d, a, b, d);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ldmatrix .x4: lane l gives the address of row (l & 7) of 8x8 matrix (l >> 3); r[i] receives matrix i.
// Without .trans lane (g,t) gets M[g][2t,2t+1]; with .trans it gets M[2t][g], M[2t+1][g].
template <bool TRANS>
SK_DEV void ldmatrix_x4(uint32_t r[4], const void* row_ptr) {
#ifdef SEGNEXT_EMU
  ::emu::ldmatrix_x4(r, row_ptr, TRANS);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row_ptr));
  if (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#endif
}

SK_DEV float shfl_xor(float v, int m) {
#ifdef SEGNEXT_EMU
  return ::emu::shfl_xor(v, m);
#else
  return __shfl_xor_sync(0xffffffffu, v, m);
#endif
}

// True on every lane when p is true on any lane of the (full) warp.
SK_DEV bool warp_any(bool p) {
#ifdef SEGNEXT_EMU
  float v = p ? 1.f : 0.f;
  for (int m = 16; m >= 1; m >>= 1) v = fmaxf(v, ::emu::shfl_xor(v, m));
  return v != 0.f;
#else
  return __any_sync(0xffffffffu, p);
#endif
}

// Two floats rounded to nearest (as from_f) into one 32-bit register of two halves (lo in the lower 16 bits): one
// cvt.rn.*x2.f32.
template <typename HT> SK_DEV uint32_t pack2(float lo, float hi);
template <> SK_DEV uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> SK_DEV uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The two halves of a pack2 register as floats (exact).
template <typename HT> SK_DEV float2 unpack2(uint32_t v);
template <> SK_DEV float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
template <> SK_DEV float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

// Asynchronous global -> shared copies (cp.async, sm_80+): cp_async8 copies 8 bytes (both addresses 8-byte
// aligned), or writes 8 zero bytes when !valid (src is then not read, but must still be a valid address);
// cp_async_commit closes a group; cp_async_wait<N> waits until at most the newest N groups are in flight. The copies
// of one lane are visible to the other lanes after its wait and a __syncwarp().
SK_DEV void cp_async8(void* dst_smem, const void* src, bool valid) {
#ifdef SEGNEXT_EMU
  ::emu::cp_async(dst_smem, src, 8, valid ? 8 : 0);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst_smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(addr), "l"(src), "r"(valid ? 8 : 0) : "memory");
#endif
}
SK_DEV void cp_async_commit() {
#ifdef SEGNEXT_EMU
  ::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
SK_DEV void cp_async_wait() {
#ifdef SEGNEXT_EMU
  ::emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Non-finite detector on packed pairs: nf = v * 0 + nf on both 16-bit halves (one fma.rn.{bf16x2,f16x2}). Started
// at 0, nf keeps halves of +-0 until a half of some v is NaN or +-Inf, which turns that half of nf into NaN; test with
// nonfinite_seen(nf).
template <typename HT> SK_DEV void nonfinite_acc2(uint32_t& nf, uint32_t v);
#ifdef SEGNEXT_EMU
template <> SK_DEV void nonfinite_acc2<__nv_bfloat16>(uint32_t& nf, uint32_t v) {
  const float2 x = unpack2<__nv_bfloat16>(v), n = unpack2<__nv_bfloat16>(nf);
  nf = pack2<__nv_bfloat16>(x.x * 0.f + n.x, x.y * 0.f + n.y);
}
template <> SK_DEV void nonfinite_acc2<__half>(uint32_t& nf, uint32_t v) {
  const float2 x = unpack2<__half>(v), n = unpack2<__half>(nf);
  nf = pack2<__half>(x.x * 0.f + n.x, x.y * 0.f + n.y);
}
#else
template <> SK_DEV void nonfinite_acc2<__nv_bfloat16>(uint32_t& nf, uint32_t v) {
  asm("fma.rn.bf16x2 %0, %1, %2, %0;" : "+r"(nf) : "r"(v), "r"(0u));
}
template <> SK_DEV void nonfinite_acc2<__half>(uint32_t& nf, uint32_t v) {
  asm("fma.rn.f16x2 %0, %1, %2, %0;" : "+r"(nf) : "r"(v), "r"(0u));
}
#endif
// Whether nonfinite_acc2 met a NaN or +-Inf (a half of nf is not +-0).
SK_DEV bool nonfinite_seen(uint32_t nf) { return (nf & 0x7fff7fffu) != 0u; }

// Warp "transpose" reduction of N = 16 or 32 per-lane values over the 32 lanes in 31 shuffles: afterwards lane L
// holds the warp total of value index L % N. The summation order is fixed (deterministic).
template <int W, int N>
SK_DEV void tr_step(float (&v)[N], int lane) {
  const bool up = (lane & W) != 0;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const float send = up ? v[i] : v[i + W];
    const float keep = up ? v[i + W] : v[i];
    v[i] = keep + shfl_xor(send, W);
  }
}

template <int N>
SK_DEV float warp_transpose_reduce(float (&v)[N]) {
  static_assert(N == 16 || N == 32, "N must be 16 or 32");
  const int lane = lane_id();
  if constexpr (N == 32) {
    tr_step<16>(v, lane);
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] += shfl_xor(v[i], 16);
  }
  tr_step<8>(v, lane);
  tr_step<4>(v, lane);
  tr_step<2>(v, lane);
  tr_step<1>(v, lane);
  return v[0];
}

}  // namespace sk
