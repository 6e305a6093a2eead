// The CPU backend of GroupNorm (torch.nn.GroupNorm / F.group_norm semantics; the GN of mmcv's ConvModule in
// SegNeXt's LightHamHead: squeeze, hamburger.ham_out, align), forward only. Bound to Python by csrc/cpu/binding.cpp.
//
//   x (B, C, *) viewed as (B, G, C/G * HW) with HW the product of the trailing sizes; per (b, g):
//   mean = sum x / n, var = sum (x - mean)^2 / n (two passes, fp32), rstd = 1 / sqrt(var + eps), n = C/G * HW
//   y[b, c, p] = (x[b, c, p] - mean) * a[c] + bias[c],  a[c] = rstd * weight[c]
//   (the deviation first: no cancellation of x * a against mean * a when the mean is large against the spread, and
//   a group of one value gives exactly its bias)
//
// Tasks are (image, group): the group's C/G * HW values are contiguous in NCHW memory and stay in L2 over the three
// passes (sum, squared deviations, affine). Each pass sums with vector partial sums in a fixed order, and every task
// is computed by one thread with the same operations whichever thread runs it: results are bitwise identical for
// any thread count. A NaN or Inf in a group makes that group's output NaN, as in eager PyTorch.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace segnext_cpu {

// x: (B, C, *) float32 or bfloat16 CPU tensor, 2-D or more, any strides (copied to contiguous NCHW once when it is
// not), B >= 0, C >= 1, any trailing sizes (0 included); num_groups >= 1 dividing C; weight, bias: (C,) float32 or
// x's dtype CPU tensors, or absent (1 and 0); eps > 0. Statistics and the affine in fp32. Returns a contiguous tensor
// of x's shape and dtype.
at::Tensor group_norm_forward(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps);

}  // namespace segnext_cpu
