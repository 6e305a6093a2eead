#include "cpu_alloc.h"

#include <atomic>
#include <limits>

namespace segnext_cpu {
namespace {
std::atomic<bool> g_poison{false};

at::Tensor poisoned(at::Tensor t) {
  if (g_poison.load(std::memory_order_relaxed) && t.numel() > 0 && t.is_floating_point())
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}
}  // namespace

void set_poison(bool on) { g_poison.store(on, std::memory_order_relaxed); }
bool poison_enabled() { return g_poison.load(std::memory_order_relaxed); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat memory_format) {
  return poisoned(at::empty(sizes, opts, memory_format));
}

at::Tensor empty_output_like(const at::Tensor& t) { return poisoned(at::empty_like(t)); }

}  // namespace segnext_cpu
