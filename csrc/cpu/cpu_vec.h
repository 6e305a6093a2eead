// Small vector helpers of the CPU MSCA forward (csrc/cpu/msca_cpu_fwd.cpp): one struct per ISA with the same static
// interface, so the kernel bodies are written once and instantiated per ISA.
//   E        element type of the compute registers (float; double for the generic float64 path)
//   reg      the register type, L lanes
//   load / loadu / store / storeu (64-byte aligned or not), set1, zero, add, mul, fmadd(a, b, c) = a * b + c
//   load_cvt<T>(p) / store_cvt<T>(p, v): L elements of T (float, c10::BFloat16, c10::Half, double) in memory,
//   converted on load / rounded to nearest even on store (NaN stays NaN, like c10's conversions).
// Every member of VecAvx2 / VecAvx512 carries its target attribute, so the header compiles without -m flags; the
// callers are compiled for the same target (msca_cpu_fwd.cpp: #pragma GCC target regions) and dispatch at run time
// on segnext_cpu::isa().
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SEGNEXT_VEC_X86 1
#else
#define SEGNEXT_VEC_X86 0
#endif

namespace segnext_cpu {
namespace vec {

// ---------------------------------------------------------------------------------------------------------------
// Portable: GCC vector extension of 16 bytes (SSE2 on baseline x86-64, NEON on aarch64); no FMA contraction assumed.
template <class E_>
struct VecGeneric {
  using E = E_;
  static constexpr int L = 16 / sizeof(E);
  typedef E reg __attribute__((vector_size(16)));
  static inline reg load(const E* p) { reg r; std::memcpy(&r, p, sizeof(r)); return r; }
  static inline reg loadu(const E* p) { reg r; std::memcpy(&r, p, sizeof(r)); return r; }
  static inline void store(E* p, reg v) { std::memcpy(p, &v, sizeof(v)); }
  static inline void storeu(E* p, reg v) { std::memcpy(p, &v, sizeof(v)); }
  static inline reg set1(E x) { reg r; for (int i = 0; i < L; ++i) r[i] = x; return r; }
  static inline reg zero() { return set1(E(0)); }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  template <class T>
  static inline reg load_cvt(const T* p) {
    reg r;
    for (int i = 0; i < L; ++i) r[i] = static_cast<E>(p[i]);
    return r;
  }
  template <class T>
  static inline void store_cvt(T* p, reg v) {
    for (int i = 0; i < L; ++i) p[i] = static_cast<T>(v[i]);
  }
};

#if SEGNEXT_VEC_X86

#define SEGNEXT_T_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline
#define SEGNEXT_T_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"), always_inline)) static inline

// ---------------------------------------------------------------------------------------------------------------
struct VecAvx2 {
  using E = float;
  static constexpr int L = 8;
  using reg = __m256;
  SEGNEXT_T_AVX2 reg load(const float* p) { return _mm256_load_ps(p); }
  SEGNEXT_T_AVX2 reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  SEGNEXT_T_AVX2 void store(float* p, reg v) { _mm256_store_ps(p, v); }
  SEGNEXT_T_AVX2 void storeu(float* p, reg v) { _mm256_storeu_ps(p, v); }
  SEGNEXT_T_AVX2 reg set1(float x) { return _mm256_set1_ps(x); }
  SEGNEXT_T_AVX2 reg zero() { return _mm256_setzero_ps(); }
  SEGNEXT_T_AVX2 reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  SEGNEXT_T_AVX2 reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  SEGNEXT_T_AVX2 reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  template <class T>
  SEGNEXT_T_AVX2 reg load_cvt(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    } else {
      static_assert(std::is_same_v<T, c10::Half>, "VecAvx2: float / bfloat16 / half");
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
  }
  template <class T>
  SEGNEXT_T_AVX2 void store_cvt(T* p, reg v) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(p, v);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // round to nearest even: (bits + 0x7fff + ((bits >> 16) & 1)) >> 16; NaN -> 0x7fc0 (as c10::BFloat16)
      __m256i b = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
      __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
      __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    } else {
      static_assert(std::is_same_v<T, c10::Half>, "VecAvx2: float / bfloat16 / half");
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
struct VecAvx512 {
  using E = float;
  static constexpr int L = 16;
  using reg = __m512;
  SEGNEXT_T_AVX512 reg load(const float* p) { return _mm512_load_ps(p); }
  SEGNEXT_T_AVX512 reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  SEGNEXT_T_AVX512 void store(float* p, reg v) { _mm512_store_ps(p, v); }
  SEGNEXT_T_AVX512 void storeu(float* p, reg v) { _mm512_storeu_ps(p, v); }
  SEGNEXT_T_AVX512 reg set1(float x) { return _mm512_set1_ps(x); }
  SEGNEXT_T_AVX512 reg zero() { return _mm512_setzero_ps(); }
  SEGNEXT_T_AVX512 reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  SEGNEXT_T_AVX512 reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  SEGNEXT_T_AVX512 reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  // bf16 bits of 16 floats, rounded to nearest even, NaN -> 0x7fc0 (as c10::BFloat16)
  SEGNEXT_T_AVX512 __m256i to_bf16_bits(reg v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
  template <class T>
  SEGNEXT_T_AVX512 reg load_cvt(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    } else {
      static_assert(std::is_same_v<T, c10::Half>, "VecAvx512: float / bfloat16 / half");
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  template <class T>
  SEGNEXT_T_AVX512 void store_cvt(T* p, reg v) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(p, v);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v));
    } else {
      static_assert(std::is_same_v<T, c10::Half>, "VecAvx512: float / bfloat16 / half");
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
};

#endif  // SEGNEXT_VEC_X86

}  // namespace vec
}  // namespace segnext_cpu
