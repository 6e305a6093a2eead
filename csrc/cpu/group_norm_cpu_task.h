// One (image, group) task of the CPU GroupNorm (math in group_norm_cpu.h). No include guard: group_norm_cpu.cpp
// includes this file once per ISA, inside a namespace that defines `using Vec = vec::Vec...;` (cpu_vec.h) and, for
// AVX2 / AVX-512, inside a #pragma GCC target region, so the same body compiles for each ISA.
//
// T is the storage type (float or c10::BFloat16); every value is computed in float.

// sum over i < n of d_i (kSquare: d_i^2), d_i = x[i] - shift, in a fixed order: four vector accumulators over blocks
// of 4 L, the whole vectors left into the first, then the four added pairwise, their lanes in order, and the scalar
// tail last. x - shift is computed as x + (-shift) (the same bits).
template <bool kSquare, class T>
float sum_dev(const T* x, int64_t n, float shift) {
  constexpr int L = Vec::L;
  const typename Vec::reg neg = Vec::set1(-shift);
  typename Vec::reg acc[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    for (int k = 0; k < 4; ++k) {
      const typename Vec::reg d = Vec::add(Vec::template load_cvt<T>(x + i + k * L), neg);
      acc[k] = kSquare ? Vec::fmadd(d, d, acc[k]) : Vec::add(acc[k], d);
    }
  }
  for (; i + L <= n; i += L) {
    const typename Vec::reg d = Vec::add(Vec::template load_cvt<T>(x + i), neg);
    acc[0] = kSquare ? Vec::fmadd(d, d, acc[0]) : Vec::add(acc[0], d);
  }
  float lanes[L];
  Vec::storeu(lanes, Vec::add(Vec::add(acc[0], acc[1]), Vec::add(acc[2], acc[3])));
  float s = 0.0f;
  for (int l = 0; l < L; ++l) s += lanes[l];
  for (; i < n; ++i) {
    const float d = static_cast<float>(x[i]) + (-shift);
    s += kSquare ? d * d : d;
  }
  return s;
}

// y[i] = (x[i] - mean) * a + s for i < hw (one channel); x - mean as x + (-mean), like sum_dev.
template <class T>
void affine_row(const T* x, T* y, int64_t hw, float mean, float a, float s) {
  constexpr int L = Vec::L;
  const typename Vec::reg neg = Vec::set1(-mean), va = Vec::set1(a), vs = Vec::set1(s);
  int64_t i = 0;
  for (; i + L <= hw; i += L)
    Vec::store_cvt(y + i, Vec::fmadd(Vec::add(Vec::template load_cvt<T>(x + i), neg), va, vs));
  for (; i < hw; ++i) y[i] = static_cast<T>((static_cast<float>(x[i]) + (-mean)) * a + s);
}

// The group of cg channels of hw values at x (contiguous), written to y; w, b: the group's cg weights and biases
// (float32) or nullptr (1 and 0). n = cg * hw >= 1.
template <class T>
void group_task(const T* x, T* y, int64_t cg, int64_t hw, const float* w, const float* b, float eps) {
  const int64_t n = cg * hw;
  const float nf = static_cast<float>(n);
  const float mean = sum_dev<false>(x, n, 0.0f) / nf;
  const float var = sum_dev<true>(x, n, mean) / nf;
  const float rstd = 1.0f / std::sqrt(var + eps);
  for (int64_t c = 0; c < cg; ++c)
    affine_row(x + c * hw, y + c * hw, hw, mean, w ? rstd * w[c] : rstd, b ? b[c] : 0.0f);
}
