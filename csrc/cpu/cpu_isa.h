// Run-time choice of the vector ISA of the CPU kernels (never assumed at build time: an installed build runs on
// any x86-64 or other CPU). Kernels are compiled several times in one translation unit under
// __attribute__((target(...))) / #pragma GCC target and dispatch on isa().
#pragma once

namespace segnext_cpu {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

// The best ISA this CPU has (avx512: AVX-512 F/BW/VL/DQ; avx2: AVX2 + FMA + F16C), lowered by the environment
// variable SEGNEXT_CPU_ISA=avx512|avx2|scalar when set (read once, at the first call; a value above what the CPU
// has is lowered to it). Thread-safe.
Isa isa();

// True when the CPU has AVX512-BF16 (vdpbf16ps) and isa() is avx512.
bool has_avx512_bf16();

const char* isa_name(Isa i);

}  // namespace segnext_cpu
