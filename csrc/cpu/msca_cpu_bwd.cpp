// Fused MSCA backward on CPU (segnext_cpu::msca_backward, declared in msca_cpu.h).
//
// The kernel body lives in msca_cpu_bwd.h (algorithm described there) and is compiled here several times, each copy
// under its own target region: AVX-512 (F/BW/VL/DQ + FMA), AVX2 (+FMA, F16C) and portable scalar (float and double);
// the copy is chosen at run time by segnext_cpu::isa(). No -march flag is needed or assumed.
#include "msca_cpu.h"

#include "cpu_alloc.h"
#include "cpu_isa.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#ifdef SEGNEXT_BWD_PROFILE
#include <ctime>
#include <cstdio>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SEGNEXT_BWD_X86 1
#else
#define SEGNEXT_BWD_X86 0
#endif

namespace segnext_cpu {
namespace {

// Type-erased arguments of one backward call (pointers into validated tensors; strides in elements).
struct BwdArgs {
  int64_t B, C, H, W;
  const void* u;
  int64_t us[4];
  const void* g;
  int64_t gs[4];
  void* du;
  int64_t dus[4];
  const void *w0, *b0, *ws, *bs, *w3, *b3;  // packed weights, contiguous, float (double for double u)
  bool need[7];
  double *dw0, *db0, *dws, *dbs, *dw3, *db3;  // zeroed accumulators (null when not needed)
};

}  // namespace

#if SEGNEXT_BWD_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace bwd_avx512 {
namespace {
#define SEGNEXT_BWD_ISA 2
#define SEGNEXT_BWD_REAL float
#include "msca_cpu_bwd.h"
#undef SEGNEXT_BWD_ISA
#undef SEGNEXT_BWD_REAL
#undef SEGNEXT_BWD_HAS_VCVT
}  // namespace
}  // namespace bwd_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace bwd_avx2 {
namespace {
#define SEGNEXT_BWD_ISA 1
#define SEGNEXT_BWD_REAL float
#include "msca_cpu_bwd.h"
#undef SEGNEXT_BWD_ISA
#undef SEGNEXT_BWD_REAL
#undef SEGNEXT_BWD_HAS_VCVT
}  // namespace
}  // namespace bwd_avx2
#pragma GCC pop_options
#endif

namespace bwd_scalar {
namespace {
#define SEGNEXT_BWD_ISA 0
#define SEGNEXT_BWD_REAL float
#include "msca_cpu_bwd.h"
#undef SEGNEXT_BWD_ISA
#undef SEGNEXT_BWD_REAL
#undef SEGNEXT_BWD_HAS_VCVT
}  // namespace
}  // namespace bwd_scalar

namespace bwd_scalar64 {
namespace {
#define SEGNEXT_BWD_ISA 0
#define SEGNEXT_BWD_REAL double
#include "msca_cpu_bwd.h"
#undef SEGNEXT_BWD_ISA
#undef SEGNEXT_BWD_REAL
#undef SEGNEXT_BWD_HAS_VCVT
}  // namespace
}  // namespace bwd_scalar64

namespace {

template <typename T>
void run_float_path(const BwdArgs& a) {
#if SEGNEXT_BWD_X86
  switch (isa()) {
    case Isa::avx512: bwd_avx512::run<T>(a); return;
    case Isa::avx2: bwd_avx2::run<T>(a); return;
    default: break;
  }
#endif
  bwd_scalar::run<T>(a);
}


}  // namespace

std::vector<at::Tensor> msca_backward(const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& w0,
                                      const at::Tensor& b0, const at::Tensor& ws, const at::Tensor& bs,
                                      const at::Tensor& w3, const at::Tensor& b3, std::array<bool, 7> needs) {
  TORCH_CHECK(u.defined() && grad_out.defined(), "msca_backward (cpu): u and grad_out must be defined tensors");
  TORCH_CHECK(u.device().is_cpu(), "msca_backward (cpu): u must be a CPU tensor, got device ", u.device());
  TORCH_CHECK(grad_out.device().is_cpu(), "msca_backward (cpu): grad_out must be a CPU tensor, got device ",
              grad_out.device());
  TORCH_CHECK(u.dim() == 4, "msca_backward (cpu): u must be 4-D (B, C, H, W), got ", u.dim(), "-D shape ",
              u.sizes());
  const at::ScalarType dt = u.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "msca_backward (cpu): u must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(grad_out.scalar_type() == dt, "msca_backward (cpu): grad_out must have u's dtype ", dt, ", got ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.sizes() == u.sizes(), "msca_backward (cpu): grad_out must have u's shape ", u.sizes(),
              ", got ", grad_out.sizes());
  const int64_t B = u.size(0), C = u.size(1), H = u.size(2), W = u.size(3);
  TORCH_CHECK(C >= 1 && H >= 1 && W >= 1, "msca_backward (cpu): u must have C, H, W >= 1, got shape ", u.sizes());
  const at::ScalarType wdt = dt == at::kDouble ? at::kDouble : at::kFloat;
  check_packed_weights("msca_backward (cpu)", C, wdt, w0, b0, ws, bs, w3, b3);

  const auto wopt = at::TensorOptions().dtype(wdt).device(at::kCPU);
  const auto dopt = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);
  const int64_t wsizes[6] = {C * 25, C, C * 78, C * 6, C * C, C};
  const std::vector<int64_t> wshapes[6] = {{C, 25}, {C}, {C, 78}, {C, 6}, {C, C}, {C}};

  at::Tensor du = needs[0] ? empty_output_like(u) : at::empty({0}, u.options());
  at::Tensor accs[6];
  for (int i = 0; i < 6; ++i) accs[i] = needs[i + 1] ? at::zeros({wsizes[i]}, dopt) : at::Tensor();

  if (B > 0 && std::any_of(needs.begin(), needs.end(), [](bool x) { return x; })) {
    const at::Tensor w0c = w0.contiguous(), b0c = b0.contiguous(), wsc = ws.contiguous(), bsc = bs.contiguous(),
                     w3c = w3.contiguous(), b3c = b3.contiguous();
    BwdArgs a;
    a.B = B;
    a.C = C;
    a.H = H;
    a.W = W;
    a.u = u.data_ptr();
    a.g = grad_out.data_ptr();
    a.du = needs[0] ? du.data_ptr() : nullptr;
    for (int i = 0; i < 4; ++i) {
      a.us[i] = u.stride(i);
      a.gs[i] = grad_out.stride(i);
      a.dus[i] = needs[0] ? du.stride(i) : 0;
    }
    a.w0 = w0c.data_ptr();
    a.b0 = b0c.data_ptr();
    a.ws = wsc.data_ptr();
    a.bs = bsc.data_ptr();
    a.w3 = w3c.data_ptr();
    a.b3 = b3c.data_ptr();
    for (int i = 0; i < 7; ++i) a.need[i] = needs[i];
    double** accp[6] = {&a.dw0, &a.db0, &a.dws, &a.dbs, &a.dw3, &a.db3};
    for (int i = 0; i < 6; ++i) *accp[i] = needs[i + 1] ? accs[i].data_ptr<double>() : nullptr;

    switch (dt) {
      case at::kFloat: run_float_path<float>(a); break;
      case at::kBFloat16: run_float_path<c10::BFloat16>(a); break;
      case at::kHalf: run_float_path<c10::Half>(a); break;
      default: bwd_scalar64::run<double>(a); break;
    }
  }

  std::vector<at::Tensor> out;
  out.reserve(7);
  out.push_back(du);
  for (int i = 0; i < 6; ++i)
    out.push_back(needs[i + 1] ? accs[i].to(wdt).reshape(wshapes[i]).contiguous() : at::empty({0}, wopt));
  return out;
}

}  // namespace segnext_cpu
