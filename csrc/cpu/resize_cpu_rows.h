// Row kernels of the bilinear resize (resize_cpu.cpp), written once against a vector struct V of cpu_vec.h and
// included once per ISA by resize_cpu.cpp, inside a namespace of its own and a #pragma GCC target region, with
// SEGNEXT_RESIZE_ROWS = 1 (AVX2 + FMA: V = VecAvx2) or 2 (AVX-512 F/BW/VL/DQ: V = VecAvx512). Uses the enclosing
// namespace's ColPtrs, Kernels and kGroup; no include guard (by design).
//
//   vrow:         tmp[0:W] = r0 * w0 + r1 * w1               (T = float or bfloat16 in memory, fp32 in tmp)
//   hrow:         out[0:OW] = tmp[x0] * wx0 + tmp[x1] * wx1  (stream: non-temporal stores; out aligned to the
//                 vector, OW a multiple of its width)
//   store_stream: dst[0:n] = src[0:n], non-temporal stores for the vector-aligned middle
//   to_bf16:      dst[0:n] = bfloat16(src[0:n]), rounded to nearest even
#if SEGNEXT_RESIZE_ROWS == 2
using V = vec::VecAvx512;
inline void stream(float* p, V::reg v) { _mm512_stream_ps(p, v); }
#elif SEGNEXT_RESIZE_ROWS == 1
using V = vec::VecAvx2;
inline void stream(float* p, V::reg v) { _mm256_stream_ps(p, v); }
#else
#error "SEGNEXT_RESIZE_ROWS must be 1 (AVX2) or 2 (AVX-512)"
#endif

template <class T>
void vrow(const T* r0, const T* r1, float w0, float w1, float* tmp, int64_t W) {
  const V::reg a = V::set1(w0), b = V::set1(w1);
  int64_t i = 0;
  for (; i + V::L <= W; i += V::L)
    V::storeu(tmp + i, V::fmadd(V::load_cvt(r1 + i), b, V::mul(V::load_cvt(r0 + i), a)));
  for (; i < W; ++i) tmp[i] = std::fma(static_cast<float>(r1[i]), w1, static_cast<float>(r0[i]) * w0);
}

#if SEGNEXT_RESIZE_ROWS == 2
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1u); }

// One 16-column group of the horizontal lerp.
inline __m512 hgroup(const float* tmp, const ColPtrs& c, int64_t g) {
  const int64_t j = g * kGroup;
  __m512 v0, v1;
  if (c.perm_ok) {  // the group's sources lie in tmp[base, base + 32): two loads, two permutes
    const float* w = tmp + c.base[g];
    const __m512 lo = _mm512_loadu_ps(w), hi = _mm512_loadu_ps(w + 16);
    v0 = _mm512_permutex2var_ps(lo, _mm512_loadu_si512(c.rel0 + j), hi);
    v1 = _mm512_permutex2var_ps(lo, _mm512_loadu_si512(c.rel1 + j), hi);
  } else {  // wide groups (downsampling by more than 2): gathers from L1
    v0 = _mm512_i32gather_ps(_mm512_loadu_si512(c.x0 + j), tmp, 4);
    v1 = _mm512_i32gather_ps(_mm512_loadu_si512(c.x1 + j), tmp, 4);
  }
  return _mm512_fmadd_ps(v1, _mm512_loadu_ps(c.w1 + j), _mm512_mul_ps(v0, _mm512_loadu_ps(c.w0 + j)));
}

void hrow(const float* tmp, const ColPtrs& c, float* out, bool streamed) {
  const int64_t full = c.OW / kGroup;
  int64_t g = 0;
  if (streamed) {
    for (; g < full; ++g) stream(out + g * kGroup, hgroup(tmp, c, g));
  } else {
    for (; g < full; ++g) _mm512_storeu_ps(out + g * kGroup, hgroup(tmp, c, g));
  }
  if (g < c.groups) _mm512_mask_storeu_ps(out + g * kGroup, tail_mask(c.OW - g * kGroup), hgroup(tmp, c, g));
}
#else
void hrow(const float* tmp, const ColPtrs& c, float* out, bool streamed) {
  int64_t j = 0;
  for (; j + 8 <= c.OW; j += 8) {
    const __m256 v0 = _mm256_i32gather_ps(tmp, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.x0 + j)), 4);
    const __m256 v1 = _mm256_i32gather_ps(tmp, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.x1 + j)), 4);
    const __m256 r = _mm256_fmadd_ps(v1, _mm256_loadu_ps(c.w1 + j), _mm256_mul_ps(v0, _mm256_loadu_ps(c.w0 + j)));
    if (streamed) stream(out + j, r);
    else _mm256_storeu_ps(out + j, r);
  }
  for (; j < c.OW; ++j) out[j] = std::fma(tmp[c.x1[j]], c.w1[j], tmp[c.x0[j]] * c.w0[j]);
}
#endif

void store_stream(const float* src, float* dst, int64_t n) {
  constexpr uintptr_t bytes = V::L * sizeof(float);
  const int64_t head = std::min<int64_t>(n, ((bytes - (reinterpret_cast<uintptr_t>(dst) & (bytes - 1))) &
                                             (bytes - 1)) / sizeof(float));
  int64_t i = 0;
  for (; i < head; ++i) dst[i] = src[i];
  for (; i + V::L <= n; i += V::L) stream(dst + i, V::loadu(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

void to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + V::L <= n; i += V::L) V::store_cvt(dst + i, V::loadu(src + i));
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

const Kernels kernels{vrow<float>, vrow<c10::BFloat16>, hrow, store_stream, to_bf16, V::L * int64_t(sizeof(float))};
