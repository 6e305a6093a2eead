// Output allocation of the CPU kernels. Tests switch on poisoning (set_poison(true), from Python through the
// binding): every output and weight-gradient tensor then starts as NaN, so an element a kernel forgets to write
// fails the comparison with the reference instead of passing by luck.
#pragma once

#include <ATen/ATen.h>

namespace segnext_cpu {

void set_poison(bool on);
bool poison_enabled();

// at::empty(sizes, opts, memory_format), NaN-filled when poisoning is on.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                        at::MemoryFormat memory_format = at::MemoryFormat::Contiguous);
// at::empty_like(t), NaN-filled when poisoning is on.
at::Tensor empty_output_like(const at::Tensor& t);

}  // namespace segnext_cpu
