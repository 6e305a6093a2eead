// The CPU backend of the final bilinear resize of SegNeXt's logits (F.interpolate(logits, size, mode="bilinear",
// align_corners)), bound to Python by csrc/cpu/binding.cpp; kernels in resize_cpu.cpp.
//
// Source coordinates and weights are PyTorch's (ATen/native/UpSample.h: area_pixel_compute_scale,
// area_pixel_compute_source_index, guard_index_and_lambda, compute_source_index_and_lambda), computed in the
// accumulation type (float for float32 / bfloat16, double for float64):
//   align_corners=False: scale = in / out, src = max(0, (dst + 0.5) * scale - 0.5)
//   align_corners=True:  scale = (in - 1) / (out - 1) (0 when out == 1), src = dst * scale
//   i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1), l1 = clamp(src - i0, 0, 1), l0 = 1 - l1
//   (in == out: i0 = i1 = dst, l0 = 1, l1 = 0)
// Per output row the two source rows are blended once into a row buffer (vertical lerp), then each output column
// is l0 * buf[i0] + l1 * buf[i1] (horizontal lerp; AVX-512: two-register permutes from L1, gathers when a 16-column
// group spans more than 32 source columns; AVX2: gathers; portable scalar code otherwise, chosen at run time by
// segnext_cpu::isa()). ATen blends horizontally first; the results agree to ~1 ulp.
//
// Output: contiguous NCHW. Outputs of 4 MiB or more are their own 2 MiB-aligned anonymous mapping (Linux; at::empty
// elsewhere), written with non-temporal stores when float32; a dead one goes back to a process-wide cache of such
// mappings (at most the output-cache limit in all) that the next call of about the same size takes, already faulted
// in. Tasks are (plane, block of output rows); every element is computed by the same instructions whichever thread
// runs it: results are bitwise identical for any thread count.
#pragma once

#include <ATen/ATen.h>

namespace segnext_cpu {

// x: (B, C, H, W) float32 / float64 / bfloat16 CPU tensor, any strides (copied to NCHW once when not contiguous),
// B >= 0, C, H, W >= 1; out_h, out_w >= 1. Returns (B, C, out_h, out_w) contiguous in x's dtype. bfloat16 is
// computed in fp32 (weights in fp32; ATen rounds its weights to bfloat16) and rounded once.
at::Tensor resize_bilinear_forward(const at::Tensor& x, int64_t out_h, int64_t out_w, bool align_corners);

// The output cache's limit in bytes (>= 0; default 512 MiB, 0 = no cache: every big output is a fresh mapping,
// unmapped when it dies); lowering it unmaps cached mappings beyond it at once. The Python package sets it once,
// when it loads the extension, from SEGNEXT_CPU_OUTPUT_CACHE_MIB (segnext_kernels/knobs.py).
void set_output_cache_limit(int64_t bytes);
// Bytes of the mappings cached now (resident, idle).
int64_t output_cache_bytes();

}  // namespace segnext_cpu
