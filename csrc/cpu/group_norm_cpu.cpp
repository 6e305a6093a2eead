// GroupNorm forward on CPU (math in group_norm_cpu.h). The per-group task (group_norm_cpu_task.h) is compiled once
// per ISA in this file: portable (GCC vector extension, 4 lanes), AVX2+FMA (8 lanes) and AVX-512 (16 lanes) by
// #pragma GCC target, no -march flags; group_norm_forward dispatches on segnext_cpu::isa(). The ISAs differ in their
// summation order and FMA use, so their results may differ in the last bits; one ISA gives the same bits for any
// thread count.
#include "group_norm_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>

#include "cpu_alloc.h"
#include "cpu_isa.h"
#include "cpu_vec.h"

namespace segnext_cpu {
namespace gn {

template <class T>
using Task = void (*)(const T*, T*, int64_t, int64_t, const float*, const float*, float);

namespace task_generic {
using Vec = vec::VecGeneric<float>;
#include "group_norm_cpu_task.h"
}  // namespace task_generic

#if SEGNEXT_VEC_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace task_avx2 {
using Vec = vec::VecAvx2;
#include "group_norm_cpu_task.h"
}  // namespace task_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace task_avx512 {
using Vec = vec::VecAvx512;
#include "group_norm_cpu_task.h"
}  // namespace task_avx512
#pragma GCC pop_options
#endif

template <class T>
Task<T> task_for_isa() {
#if SEGNEXT_VEC_X86
  if (isa() == Isa::avx512) return task_avx512::group_task<T>;
  if (isa() == Isa::avx2) return task_avx2::group_task<T>;
#endif
  return task_generic::group_task<T>;
}

// A float32 contiguous copy of an optional (C,) vector (a view when it is one already), or an undefined tensor.
at::Tensor vec_f32(const std::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const at::ScalarType dt = t->scalar_type();
  TORCH_CHECK(t->device().is_cpu() && (dt == at::kFloat || dt == at::kBFloat16) && t->sizes() == at::IntArrayRef({C}),
              "group_norm_forward: ", name, " must be a float32 or bfloat16 CPU tensor of shape (", C, "), got ",
              t->sizes(), " ", dt, " on ", t->device());
  return t->to(at::kFloat).contiguous();
}

template <class T>
void run(const at::Tensor& x, at::Tensor& y, int64_t G, const at::Tensor& w, const at::Tensor& b, float eps) {
  const int64_t B = x.size(0), C = x.size(1), cg = C / G, hw = x.numel() / (B * C);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const Task<T> task = task_for_isa<T>();
  at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t % G, off = t * cg * hw;  // group t of the (B * G) groups, in memory order
      task(xp + off, yp + off, cg, hw, wp ? wp + g * cg : nullptr, bp ? bp + g * cg : nullptr, eps);
    }
  });
}

}  // namespace gn

at::Tensor group_norm_forward(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && (dt == at::kFloat || dt == at::kBFloat16) && x.dim() >= 2,
              "group_norm_forward: x must be a (B, C, *) float32 or bfloat16 CPU tensor of 2 or more dimensions, got ",
              x.sizes(), " ", dt, " on ", x.device());
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 1 && num_groups >= 1 && C % num_groups == 0,
              "group_norm_forward: num_groups must be >= 1 and divide C, got num_groups = ", num_groups, ", C = ", C);
  TORCH_CHECK(eps > 0, "group_norm_forward: eps must be > 0, got ", eps);
  const at::Tensor w = gn::vec_f32(weight, C, "weight"), b = gn::vec_f32(bias, C, "bias");
  at::Tensor y = empty_output(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous();
  if (dt == at::kFloat)
    gn::run<float>(xc, y, num_groups, w, b, static_cast<float>(eps));
  else
    gn::run<c10::BFloat16>(xc, y, num_groups, w, b, static_cast<float>(eps));
  return y;
}

}  // namespace segnext_cpu
