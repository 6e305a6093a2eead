// A bfloat16 GEMM on AVX512-BF16 (vdpbf16ps) for the fused CPU kernels' tiles: the low-precision GEMM of the MLP
// and the pointwise convolutions when their tensors are bfloat16 (torch.autocast("cpu", torch.bfloat16)).
//
// Why our own: torch's at::native::cpublas::brgemm for bfloat16 packs its operands only with AMX
// (cpublas::could_pack); on a CPU with AVX512-BF16 and no AMX it ran ~45 GF/s per core in one-off timings on the
// AMD EPYC dev machine, against ~250 for its fp32 kernel. This one keeps oneDNN's idea (a register-blocked
// micro-kernel over packed panels) and nothing else. Where the CPU has AMX, torch's bfloat16 brgemm does pack (on AMX
// tiles) and gemm_bf16 calls it instead (gemm_bf16.cpp): on the Intel Xeon machine (AMX) the fused SegNeXt-T bf16
// forward went from 116 to 73 ms and -B from 499 to 222 (one-off, 2 threads; fp32: 84 and 320).
//
//   C (M x N, fp32, row-major, ldc) (+)= A (M x K, row-major, lda) @ B (K x N, row-major, ldb)
//
// A and B (float or c10::BFloat16) are rounded to bfloat16 (nearest even, NaN kept) while packed; products and sums
// are fp32 (vdpbf16ps adds the two products of a pair of k, then accumulates in fp32). The order of the operations
// depends on (M, N, K) only, so results are bitwise the same for any thread that calls it. Single-threaded (called
// inside the kernels' at::parallel_for tasks); scratch is per thread and kept between calls.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace segnext_cpu {
namespace gemm {

// True when the CPU has AVX512-BF16 and the kernels' ISA is AVX-512 (cpu_isa.h): gemm_bf16 runs vdpbf16ps (or AMX).
// Without it gemm_bf16 rounds A and B to bfloat16 into fp32 copies and runs torch's fp32 GEMM on them: the same
// operands (bfloat16 products are exact in fp32), the fp32 sums in another order.
bool bf16_available();

// True when bf16_available() and torch's bfloat16 brgemm packs (AMX): gemm_bf16 then runs on AMX tiles.
bool amx_available();

// Any CPU (see bf16_available). M, N, K >= 0 (K = 0: C = 0, or unchanged when accumulate).
template <class TA, class TB>
void gemm_bf16(int64_t M, int64_t N, int64_t K, const TA* A, int64_t lda, const TB* B, int64_t ldb, bool accumulate,
               float* C, int64_t ldc);

}  // namespace gemm
}  // namespace segnext_cpu
