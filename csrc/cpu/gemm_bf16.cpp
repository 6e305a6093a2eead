// The AVX512-BF16 GEMM of gemm_bf16.h (and its portable fallback, run_rounded, for CPUs without AVX512-BF16).
//
// Packing: A once per call into pairs of k (M x ceil(K/2) uint32, a zero bfloat16 after an odd K); B per block of 64
// columns into pairs of k rows interleaved lane by lane (ceil(K/2) x 64 uint32, zero-padded), the layout vdpbf16ps
// reads: one 64-byte load holds 16 columns x 2 k. The block (<= K * 128 bytes) stays in L1/L2 while every block of
// 6 rows of A runs over it: 6 x 4 fp32 accumulators, per pair of k 4 loads of B, 6 broadcasts of A, 24 vdpbf16ps.
//
// On a CPU with AMX (torch's cpublas::could_pack(kBFloat16): oneDNN then runs bfloat16 brgemm on AMX tiles) the same
// GEMM goes to at::native::cpublas::brgemm instead: A rounded to bfloat16 rows (pack_a's layout is row-major
// bfloat16 with an even K), B per block of kNBA columns rounded to bfloat16 rows and packed by cpublas::pack into
// oneDNN's VNNI layout, fp32 C; the AMX tile state is released after each call (brgemm_release).
#include "gemm_bf16.h"
#include "cpu_scratch.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "cpu_isa.h"
#include "cpu_vec.h"

namespace segnext_cpu {
namespace gemm {

bool bf16_available() { return has_avx512_bf16(); }

bool amx_available() {
  static const bool ok = has_avx512_bf16() && at::native::cpublas::could_pack(at::kBFloat16);
  return ok;
}

namespace {

// gemm_bf16's own per-thread buffers (it runs inside the MSCA and MLP kernels, whose slots are in use).
using Scratch = ScratchBuffer;

// gemm_bf16 without AVX512-BF16 (an AVX2 CPU, or not x86): A and B rounded to bfloat16 (nearest even, NaN kept:
// c10::BFloat16's conversion) into fp32 copies, then torch's fp32 brgemm on them (oneDNN's JIT kernel; its CPU
// BLAS where the ukernel is unavailable) on blocks of at most 256 columns of B. A product of two bfloat16 values is
// exact in fp32, so the result differs from the vdpbf16ps kernel's only in the order of the fp32 sums: the same
// operands on every CPU.
template <class T>
inline float round_bf16(T v) {
  return static_cast<float>(c10::BFloat16(static_cast<float>(v)));
}

#if SEGNEXT_VEC_X86
// round_row's AVX2 part: the elements [0, n - n % 8); returns their count
template <class T>
__attribute__((target("avx2,fma,f16c"))) int64_t round_row_avx2(const T* s, int64_t n, float* d) {
  using V = vec::VecAvx2;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    c10::BFloat16 t[8];
    V::store_cvt(t, V::load_cvt(s + i));
    V::storeu(d + i, V::load_cvt(t));
  }
  return i;
}
#endif

// d[i] = s[i] rounded to bfloat16, as float, i < n: 8 at a time on AVX2 (cpu_vec.h's rounding, as c10's)
template <class T>
void round_row(const T* s, int64_t n, float* d) {
  int64_t i = 0;
#if SEGNEXT_VEC_X86
  if (isa() >= Isa::avx2) i = round_row_avx2(s, n, d);
#endif
  for (; i < n; ++i) d[i] = round_bf16(s[i]);
}

template <class TA, class TB>
void run_rounded(int64_t M, int64_t N, int64_t K, const TA* A, int64_t lda, const TB* B, int64_t ldb,
                 bool accumulate, float* C, int64_t ldc) {
  if (K == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill_n(C + m * ldc, N, 0.0f);
    return;
  }
  thread_local Scratch sa, sb;
  float* Ar = static_cast<float*>(sa.get(sizeof(float) * M * K));
  for (int64_t m = 0; m < M; ++m) round_row(A + m * lda, K, Ar + m * K);
  const int64_t nb = std::min<int64_t>(N, 256);
  float* Br = static_cast<float*>(sb.get(sizeof(float) * K * nb));
  for (int64_t j = 0; j < N; j += nb) {
    const int64_t n = std::min(nb, N - j);
    for (int64_t k = 0; k < K; ++k) round_row(B + k * ldb + j, n, Br + k * n);
    at::native::cpublas::brgemm(M, n, K, K, n, ldc, accumulate, Ar, Br, C + j, false);
  }
}

}  // namespace

#if SEGNEXT_VEC_X86
namespace {

#define SEGNEXT_T_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))

constexpr int kMR = 6;    // rows of A per tile
constexpr int kNB = 64;   // columns of B per packed block (4 vectors of 16)

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// 16 elements (n valid, the rest read as 0) as bfloat16 bits
template <class T>
SEGNEXT_T_BF16 inline __m256i load_bits(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return vec::VecAvx512::to_bf16_bits(_mm512_maskz_loadu_ps(lanes(n), p));
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "gemm_bf16: float or bfloat16 operands");
    return _mm256_maskz_loadu_epi16(lanes(n), p);
  }
}

template <class TA>
SEGNEXT_T_BF16 void pack_a(const TA* A, int64_t lda, int64_t M, int64_t K, uint32_t* Ap) {
  const int64_t K2 = (K + 1) / 2;
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* d = reinterpret_cast<uint16_t*>(Ap + m * K2);
    const TA* s = A + m * lda;
    for (int64_t k = 0; k < K; k += 16)
      _mm256_mask_storeu_epi16(d + k, lanes(K - k), load_bits(s + k, K - k));
    if (K & 1) d[K] = 0;
  }
}

// columns [j, j + nv) of B (nv <= kNB) -> Bp[k2][kNB] pairs (zero beyond nv and beyond K)
template <class TB>
SEGNEXT_T_BF16 void pack_b(const TB* B, int64_t ldb, int64_t K, int64_t nv, uint32_t* Bp) {
  const int64_t K2 = (K + 1) / 2;
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    const TB* r0 = B + (2 * k2) * ldb;
    const bool two = 2 * k2 + 1 < K;
    uint32_t* d = Bp + k2 * kNB;
    for (int64_t q = 0; q < kNB; q += 16) {
      const int64_t n = nv - q;
      __m512i v = _mm512_setzero_si512();
      if (n > 0) {
        v = _mm512_cvtepu16_epi32(load_bits(r0 + q, n));
        if (two) v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_cvtepu16_epi32(load_bits(r0 + ldb + q, n)), 16));
      }
      _mm512_store_si512(reinterpret_cast<void*>(d + q), v);
    }
  }
}

template <int MR, int NR>
SEGNEXT_T_BF16 void tile(const uint32_t* Ap, int64_t K2, const uint32_t* Bp, float* C, int64_t ldc, int64_t nv,
                         bool accumulate) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh b[NR];
    for (int n = 0; n < NR; ++n)
      b[n] = (__m512bh)_mm512_load_si512(reinterpret_cast<const void*>(Bp + k * kNB + 16 * n));
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(Ap[m * K2 + k]));
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], a, b[n]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* c = C + m * ldc;
    for (int n = 0; n < NR; ++n) {
      const __mmask16 k = lanes(nv - 16 * n);
      __m512 v = acc[m][n];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, c + 16 * n));
      _mm512_mask_storeu_ps(c + 16 * n, k, v);
    }
  }
}

template <int MR>
SEGNEXT_T_BF16 inline void tile_n(int nr, const uint32_t* Ap, int64_t K2, const uint32_t* Bp, float* C, int64_t ldc,
                                  int64_t nv, bool accumulate) {
  switch (nr) {
    case 1: tile<MR, 1>(Ap, K2, Bp, C, ldc, nv, accumulate); break;
    case 2: tile<MR, 2>(Ap, K2, Bp, C, ldc, nv, accumulate); break;
    case 3: tile<MR, 3>(Ap, K2, Bp, C, ldc, nv, accumulate); break;
    default: tile<MR, 4>(Ap, K2, Bp, C, ldc, nv, accumulate); break;
  }
}

constexpr int64_t kNBA = 64;  // columns of B per packed block on the AMX path (oneDNN's packing takes ld 64)


// columns [j, j + nv) of B -> Bb (K2 * 2 rows x kNBA, bfloat16 bits, row-major; zero beyond nv and in the row after
// an odd K)
template <class TB>
SEGNEXT_T_BF16 void rows_b(const TB* B, int64_t ldb, int64_t K, int64_t nv, uint16_t* Bb) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t q = 0; q < kNBA; q += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(Bb + k * kNBA + q),
                          q < nv ? load_bits(B + k * ldb + q, nv - q) : _mm256_setzero_si256());
  if (K & 1) std::fill_n(Bb + K * kNBA, kNBA, uint16_t(0));
}

template <class TA, class TB>
SEGNEXT_T_BF16 void run_amx(int64_t M, int64_t N, int64_t K, const TA* A, int64_t lda, const TB* B, int64_t ldb,
                            bool accumulate, float* C, int64_t ldc) {
  thread_local Scratch sa, sb, sp;
  const int64_t K2 = (K + 1) / 2, Ke = 2 * K2;
  uint32_t* Ap = static_cast<uint32_t*>(sa.get(sizeof(uint32_t) * M * K2));
  pack_a(A, lda, M, K, Ap);  // row m: Ke bfloat16, the last one zero for an odd K
  const auto* Ab = reinterpret_cast<const at::BFloat16*>(Ap);
  uint16_t* Bb = static_cast<uint16_t*>(sb.get(sizeof(uint16_t) * Ke * kNBA));
  auto* Bk = static_cast<at::BFloat16*>(sp.get(sizeof(uint16_t) * Ke * kNBA));
  for (int64_t j = 0; j < N; j += kNBA) {
    const int64_t nv = std::min<int64_t>(kNBA, N - j);
    rows_b(B + j, ldb, K, nv, Bb);
    at::native::cpublas::pack(Ke, kNBA, kNBA, kNBA, at::kBFloat16, at::kBFloat16, Bb, Bk);
    at::native::cpublas::brgemm(M, nv, Ke, Ke, kNBA, ldc, accumulate, Ab, Bk, C + j, true);
  }
  at::native::cpublas::brgemm_release(true);
}

template <class TA, class TB>
SEGNEXT_T_BF16 void run(int64_t M, int64_t N, int64_t K, const TA* A, int64_t lda, const TB* B, int64_t ldb,
                        bool accumulate, float* C, int64_t ldc) {
  if (K > 0 && amx_available()) {
    run_amx(M, N, K, A, lda, B, ldb, accumulate, C, ldc);
    return;
  }
  thread_local Scratch sa, sb;
  const int64_t K2 = (K + 1) / 2;
  uint32_t* Ap = static_cast<uint32_t*>(sa.get(sizeof(uint32_t) * M * K2));
  uint32_t* Bp = static_cast<uint32_t*>(sb.get(sizeof(uint32_t) * K2 * kNB));
  pack_a(A, lda, M, K, Ap);
  for (int64_t j = 0; j < N; j += kNB) {
    const int64_t nv = std::min<int64_t>(kNB, N - j);
    const int nr = static_cast<int>((nv + 15) / 16);
    pack_b(B + j, ldb, K, nv, Bp);
    int64_t m0 = 0;
    for (; m0 + kMR <= M; m0 += kMR) tile_n<kMR>(nr, Ap + m0 * K2, K2, Bp, C + m0 * ldc + j, ldc, nv, accumulate);
    const uint32_t* ap = Ap + m0 * K2;
    float* c = C + m0 * ldc + j;
    switch (M - m0) {
      case 1: tile_n<1>(nr, ap, K2, Bp, c, ldc, nv, accumulate); break;
      case 2: tile_n<2>(nr, ap, K2, Bp, c, ldc, nv, accumulate); break;
      case 3: tile_n<3>(nr, ap, K2, Bp, c, ldc, nv, accumulate); break;
      case 4: tile_n<4>(nr, ap, K2, Bp, c, ldc, nv, accumulate); break;
      case 5: tile_n<5>(nr, ap, K2, Bp, c, ldc, nv, accumulate); break;
      default: break;
    }
  }
}

}  // namespace
#endif  // SEGNEXT_VEC_X86

template <class TA, class TB>
void gemm_bf16(int64_t M, int64_t N, int64_t K, const TA* A, int64_t lda, const TB* B, int64_t ldb, bool accumulate,
               float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
#if SEGNEXT_VEC_X86
  if (bf16_available()) {
    run<TA, TB>(M, N, K, A, lda, B, ldb, accumulate, C, ldc);
    return;
  }
#endif
  run_rounded<TA, TB>(M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

template void gemm_bf16<float, float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, bool,
                                      float*, int64_t);
template void gemm_bf16<float, c10::BFloat16>(int64_t, int64_t, int64_t, const float*, int64_t, const c10::BFloat16*,
                                              int64_t, bool, float*, int64_t);
template void gemm_bf16<c10::BFloat16, float>(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const float*,
                                              int64_t, bool, float*, int64_t);
template void gemm_bf16<c10::BFloat16, c10::BFloat16>(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t,
                                                      const c10::BFloat16*, int64_t, bool, float*, int64_t);

}  // namespace gemm
}  // namespace segnext_cpu
