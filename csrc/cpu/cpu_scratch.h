// Per-thread scratch buffers of the CPU kernels, kept between calls so that a call's scratch is neither page-faulted
// in nor zeroed anew. One set of kScratchSlots slots per thread, shared by the MSCA forward (msca_cpu_fwd.cpp) and
// the MLP kernels (mlp_cpu_*.cpp): neither runs inside the other, so a thread's slots serve one kernel call at a
// time, and what stays held between calls is the larger of the two per slot instead of their sum. gemm_bf16 keeps
// buffers of its own (it runs inside both). A buffer grows (its old contents dropped) and never shrinks.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>

namespace segnext_cpu {

// A growable 64-byte aligned buffer (whole 4 KiB pages).
struct ScratchBuffer {
  void* p = nullptr;
  size_t cap = 0;
  void* get(size_t bytes) {
    if (bytes > cap) {
      std::free(p);
      p = nullptr;
      cap = 0;
      const size_t n = (std::max<size_t>(bytes, 64) + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, n);
      TORCH_CHECK(p != nullptr, "segnext_kernels CPU kernels: cannot allocate ", n, " bytes of scratch");
      cap = n;
    }
    return p;
  }
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { std::free(p); }
};

constexpr int kScratchSlots = 8;

// Slot `which` (0 .. kScratchSlots - 1) of the calling thread. Slots used by one kernel call must be distinct where
// their contents are live at the same time on one thread (each kernel file lists its slots).
inline ScratchBuffer& thread_scratch(int which) {
  thread_local ScratchBuffer slots[kScratchSlots];
  return slots[which];
}

}  // namespace segnext_cpu
