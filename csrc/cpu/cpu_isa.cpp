#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace segnext_cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx2;
#endif
  return Isa::scalar;
}

Isa choose() {
  Isa best = detect();
  const char* env = std::getenv("SEGNEXT_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want = best;
  if (std::strcmp(env, "scalar") == 0) want = Isa::scalar;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::avx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::avx512;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

}  // namespace

Isa isa() {
  static const Isa chosen = choose();  // C++11 magic static: initialised once, thread-safe
  return chosen;
}

bool has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool yes = isa() == Isa::avx512 && __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace segnext_cpu
