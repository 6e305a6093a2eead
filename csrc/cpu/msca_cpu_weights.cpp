// MSCA's packed weights on CPU (layout: msca_cpu.h): the entry points' checks of them, and for the eager direct path
// (segnext_kernels/msca/cpu.py `direct`) the official nn.Conv2d weights packed here in one call (the values
// segnext_kernels.msca.reference.pack_weights gives) and the packed gradients unpacked back to the official shapes
// and dtypes. In C++ because the same dozen tensor ops from Python cost tens of microseconds per call, a third of
// the whole forward at SegNeXt's 16 x 16 stage.
#include "msca_cpu.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace segnext_cpu {

namespace {
constexpr int64_t kStripLen[6] = {7, 7, 11, 11, 21, 21};

void check_weight(const char* op, const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must have dtype ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}
}  // namespace

void check_packed_weights(const char* op, int64_t C, at::ScalarType wdt, const at::Tensor& w0, const at::Tensor& b0,
                          const at::Tensor& ws, const at::Tensor& bs, const at::Tensor& w3, const at::Tensor& b3) {
  check_weight(op, w0, "w0", wdt, {C, 25});
  check_weight(op, b0, "b0", wdt, {C});
  check_weight(op, ws, "ws", wdt, {C, 78});
  check_weight(op, bs, "bs", wdt, {C, 6});
  check_weight(op, w3, "w3", wdt, {C, C});
  check_weight(op, b3, "b3", wdt, {C});
}

namespace {

// t (any dtype and strides) as a contiguous tensor of dtype dt (itself when it is one already)
at::Tensor as_dense(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt && t.is_contiguous() ? t : t.to(dt).contiguous();
}

template <class E>
void pack_small(E* dst, at::ScalarType dt, int64_t C, const at::Tensor& w0, const at::Tensor& b0, const std::vector<at::Tensor>& ws,
                const std::vector<at::Tensor>& bs, const at::Tensor& b3) {
  // dst: w0 (C, 25) | b0 (C) | ws (C, 78) | bs (C, 6) | b3 (C), at the kSmall* offsets (msca_cpu.h)
  const at::Tensor w0c = as_dense(w0, dt), b0c = as_dense(b0, dt), b3c = as_dense(b3, dt);
  std::copy_n(w0c.data_ptr<E>(), C * 25, dst + C * kSmallW0);
  std::copy_n(b0c.data_ptr<E>(), C, dst + C * kSmallB0);
  E* wsp = dst + C * kSmallWs;
  int64_t off = 0;
  for (int i = 0; i < 6; ++i) {
    const at::Tensor wc = as_dense(ws[i], dt), bc = as_dense(bs[i], dt);
    const E* w = wc.data_ptr<E>();
    const E* b = bc.data_ptr<E>();
    const int64_t k = kStripLen[i];
    for (int64_t c = 0; c < C; ++c) std::copy_n(w + c * k, k, wsp + c * 78 + off);
    E* bsp = dst + C * kSmallBs + i;
    for (int64_t c = 0; c < C; ++c) bsp[c * 6] = b[c];
    off += k;
  }
  std::copy_n(b3c.data_ptr<E>(), C, dst + C * kSmallB3);
}

}  // namespace

at::Tensor msca_pack_small(void* dst, at::ScalarType u_dtype, const at::Tensor& w0, const at::Tensor& b0,
                           const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& bs, const at::Tensor& w3,
                           const at::Tensor& b3) {
  TORCH_CHECK(ws.size() == 6 && bs.size() == 6, "msca_pack_weights: expected 6 strip weights and 6 strip biases, got ",
              ws.size(), " and ", bs.size());
  const int64_t C = w0.size(0);
  const auto wdt = u_dtype == at::kDouble ? at::kDouble : at::kFloat;
  // the weights convert to wdt first (exact for float16 / bfloat16 -> float32), then move: the values
  // reference.pack_weights gives (reshape / cat / stack, then .to)
  if (wdt == at::kDouble)
    pack_small<double>(static_cast<double*>(dst), wdt, C, w0, b0, ws, bs, b3);
  else
    pack_small<float>(static_cast<float*>(dst), wdt, C, w0, b0, ws, bs, b3);
  return as_dense(w3, wdt).view({C, C});
}

std::vector<at::Tensor> msca_pack_weights(const at::Tensor& w0, const at::Tensor& b0,
                                          const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& bs,
                                          const at::Tensor& w3, const at::Tensor& b3, bool float64) {
  const int64_t C = w0.size(0);
  const auto wdt = float64 ? at::kDouble : at::kFloat;
  const at::Tensor buf = at::empty({C * kSmallElems}, at::TensorOptions().dtype(wdt).device(at::kCPU));
  const at::Tensor w3p = msca_pack_small(buf.data_ptr(), wdt, w0, b0, ws, bs, w3, b3);
  return {buf.narrow(0, C * kSmallW0, C * 25).view({C, 25}), buf.narrow(0, C * kSmallB0, C),
          buf.narrow(0, C * kSmallWs, C * 78).view({C, 78}), buf.narrow(0, C * kSmallBs, C * 6).view({C, 6}), w3p,
          buf.narrow(0, C * kSmallB3, C)};
}

std::vector<at::Tensor> msca_unpack_grads(const std::vector<at::Tensor>& g, at::ScalarType dtype,
                                          const std::vector<bool>& needs) {
  TORCH_CHECK(g.size() == 7 && needs.size() == 16, "msca_unpack_grads: expected 7 packed gradients and 16 flags");
  std::vector<at::Tensor> out(16);
  auto cast = [&](const at::Tensor& t) { return t.to(dtype).contiguous(); };
  if (needs[0]) out[0] = cast(g[1].reshape({g[1].size(0), 1, 5, 5}));
  if (needs[1]) out[1] = cast(g[2]);
  int64_t off = 0;
  for (int i = 0; i < 6; ++i) {
    const int64_t k = kStripLen[i];
    if (needs[2 + i]) {
      const int64_t Cs = g[3].size(0);
      const at::Tensor part = g[3].narrow(1, off, k);
      out[2 + i] = cast(i % 2 == 0 ? part.reshape({Cs, 1, 1, k}) : part.reshape({Cs, 1, k, 1}));
    }
    if (needs[8 + i]) out[8 + i] = cast(g[4].select(1, i));
    off += k;
  }
  if (needs[14]) out[14] = cast(g[5].reshape({g[5].size(0), g[5].size(1), 1, 1}));
  if (needs[15]) out[15] = cast(g[6]);
  return out;
}

}  // namespace segnext_cpu
