// Minimal single-OS-thread CUDA emulator used only by the tests (tests/helpers/emu_build.py builds with it).
//
// It compiles the real kernel sources (csrc/msca/*.cu, csrc/nmf/*.cu) as host C++ (g++ -x c++ -DSEGNEXT_EMU) and
// runs every CUDA thread of a block as a cooperative fiber (ucontext).  __syncthreads(),
// warp shuffles, ldmatrix and mma.sync are emulated with the documented PTX fragment layouts,
// so the index arithmetic, shared-memory layouts, halos, zero padding, barrier placement and
// fragment bookkeeping of the kernels are exercised on a CPU.  A barrier that not every live
// thread of the block (or lane of the warp) reaches is reported as an error instead of hanging.
// Fibers switch only at barriers and collectives; emu_set_order() runs them in ascending, descending or random
// order, so a missing __syncthreads() shows up as results that differ between orders. Writes past the dynamic
// shared-memory size are caught by a canary zone. What it cannot check: timing, register pressure, memory-model
// subtleties beyond barrier ordering, and the hardware itself (fragment layouts are emulated from the PTX ISA).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>
#include <functional>
#include <utility>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace emu {

// One cp.async copy, done when its group is waited for (cp.async.wait_group), not when issued: a read of the
// destination before the wait sees the old bytes, as on the GPU.
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;  // src_bytes < bytes: the rest zero-filled (0: src not read)
};

struct Fiber {
  std::vector<PendingCopy> open;                 // issued, not yet committed
  std::vector<std::vector<PendingCopy>> groups;  // committed groups, oldest first
  ucontext_t ctx;
  char* stack = nullptr;
  int tid = 0;
  bool done = false;
  int wait = 0;          // 0 = runnable, 1 = block barrier, 2 = warp barrier
  unsigned wait_gen = 0;
};

struct WarpScratch {
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
  const void* addr[32];
  uint32_t shfl[32];
  unsigned count = 0, gen = 0;
};

struct State {
  std::vector<Fiber> fibers;
  std::vector<WarpScratch> warps;
  ucontext_t sched;
  int cur = -1;
  int nthreads = 0;
  unsigned bar_count = 0, bar_gen = 0;
  std::vector<unsigned char> smem;
  size_t smem_bytes = 0;
  std::function<void()> body;
  std::string error;
  size_t stack_bytes = 256 * 1024;
  int order = 0;          // fiber scheduling order: 0 ascending, 1 descending, 2 pseudo-random per round
  uint64_t rng = 88172645463325252ull;
};

inline State& S() { static State s; return s; }
inline uint3& tIdx() { static uint3 v; return v; }
inline uint3& bIdx() { static uint3 v; return v; }
inline dim3& bDim() { static dim3 v; return v; }
inline dim3& gDim() { static dim3 v; return v; }

inline void yield_to_sched() {
  State& s = S();
  swapcontext(&s.fibers[s.cur].ctx, &s.sched);
}

inline void syncthreads() {
  State& s = S();
  Fiber& f = s.fibers[s.cur];
  unsigned gen = s.bar_gen;
  if (++s.bar_count == (unsigned)s.nthreads) {
    s.bar_count = 0;
    s.bar_gen++;
    return;
  }
  f.wait = 1;
  f.wait_gen = gen;
  yield_to_sched();
}

inline void syncwarp() {
  State& s = S();
  Fiber& f = s.fibers[s.cur];
  WarpScratch& w = s.warps[f.tid / 32];
  unsigned gen = w.gen;
  if (++w.count == 32u) {
    w.count = 0;
    w.gen++;
    return;
  }
  f.wait = 2;
  f.wait_gen = gen;
  yield_to_sched();
}

inline int lane() { return S().fibers[S().cur].tid & 31; }
inline WarpScratch& warp() { State& s = S(); return s.warps[s.fibers[s.cur].tid / 32]; }

extern "C" inline void fiber_entry() {
  State& s = S();
  s.body();
  s.fibers[s.cur].done = true;
  swapcontext(&s.fibers[s.cur].ctx, &s.sched);
}

// Runs body() for every thread of one block.
inline void run_block(int nthreads, const std::function<void()>& body) {
  State& s = S();
  if (nthreads % 32 != 0) throw std::runtime_error("emu: blockDim must be a multiple of 32");
  s.body = body;
  s.nthreads = nthreads;
  s.bar_count = 0;
  if ((int)s.fibers.size() < nthreads) {
    size_t old = s.fibers.size();
    s.fibers.resize(nthreads);
    for (size_t i = old; i < s.fibers.size(); ++i) s.fibers[i].stack = (char*)std::malloc(s.stack_bytes);
  }
  s.warps.assign(nthreads / 32, WarpScratch{});
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = s.fibers[i];
    f.tid = i; f.done = false; f.wait = 0;
    f.open.clear(); f.groups.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = s.stack_bytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())fiber_entry, 0);
  }
  int ndone = 0;
  std::vector<int> perm(nthreads);
  for (int i = 0; i < nthreads; ++i) perm[i] = s.order == 1 ? nthreads - 1 - i : i;
  while (ndone < nthreads) {
    bool progress = false;
    if (s.order == 2) {  // Fisher-Yates with xorshift
      for (int i = nthreads - 1; i > 0; --i) {
        s.rng ^= s.rng << 13; s.rng ^= s.rng >> 7; s.rng ^= s.rng << 17;
        std::swap(perm[i], perm[(int)(s.rng % (uint64_t)(i + 1))]);
      }
    }
    for (int k = 0; k < nthreads; ++k) {
      const int i = perm[k];
      Fiber& f = s.fibers[i];
      if (f.done) continue;
      if (f.wait == 1 && f.wait_gen == s.bar_gen) continue;
      if (f.wait == 2 && f.wait_gen == s.warps[i / 32].gen) continue;
      f.wait = 0;
      s.cur = i;
      tIdx() = make_uint3(i % bDim().x, (i / bDim().x) % bDim().y, i / (bDim().x * bDim().y));
      swapcontext(&s.sched, &f.ctx);
      progress = true;
      if (f.done) {
        ++ndone;
        if (s.bar_count != 0) throw std::runtime_error("emu: a thread exited while others wait at __syncthreads");
        if (s.warps[i / 32].count != 0) throw std::runtime_error("emu: a lane exited while its warp waits in a collective");
        if (!f.open.empty() || !f.groups.empty()) throw std::runtime_error("emu: a thread exited with cp.async copies never waited for");
      }
    }
    if (!progress) throw std::runtime_error("emu: deadlock (divergent barrier or warp collective)");
  }
  s.cur = -1;
}

inline unsigned char* dyn_smem() {
  uintptr_t p = (uintptr_t)S().smem.data();
  p = (p + 15) & ~(uintptr_t)15;
  return (unsigned char*)p;
}

template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  State& s = S();
  gDim() = grid;
  bDim() = block;
  // garbage-filled like real shared memory (with NaN bytes, below), followed by a canary zone that must stay untouched
  const size_t kCanary = 4096;
  s.smem.assign(smem_bytes + 16 + kCanary, 0xCD);
  s.smem_bytes = smem_bytes;
  int nthreads = block.x * block.y * block.z;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        bIdx() = make_uint3(x, y, z);
        // data area: 0xFF bytes, a NaN in every float dtype (fp32, fp16, bf16), so that an uninitialised value that
        // meets a zero weight (0 * NaN = NaN) shows in the results; canary after it: 0xCD
        std::memset(s.smem.data(), 0xCD, s.smem.size());
        std::memset(dyn_smem(), 0xFF, smem_bytes);
        run_block(nthreads, [&]() { kernel(args...); });
        const unsigned char* base = dyn_smem();
        for (size_t i = smem_bytes; i < smem_bytes + kCanary; ++i)
          if (base[i] != 0xCD) throw std::runtime_error("emu: write beyond the dynamic shared memory size");
      }
}


// ---- counters the tests read (emu_main.cpp) ------------------------------------------------------------------------
// channels that the tensor-core depthwise variant redid with the direct taps (a NaN / Inf seen): finite inputs must
// leave it at 0, or a fragment bug would hide behind the (correct but slow) fallback
inline long long& mma_direct_redos() { static long long n = 0; return n; }

// ---- cp.async (sm_80): deferred copies ---------------------------------------------------------------------------
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  State& s = S();
  const unsigned char* lo = dyn_smem();
  const unsigned char* d = static_cast<const unsigned char*>(dst);
  if (d < lo || d + bytes > lo + s.smem_bytes) throw std::runtime_error("emu: cp.async destination outside the dynamic shared memory");
  if (((uintptr_t)dst % bytes) != 0 || (src_bytes > 0 && ((uintptr_t)src % bytes) != 0))
    throw std::runtime_error("emu: cp.async address not aligned to the copy size");
  s.fibers[s.cur].open.push_back(PendingCopy{dst, src, bytes, src_bytes});
}
inline void cp_async_commit() {
  Fiber& f = S().fibers[S().cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
// cp.async.wait_group n: every committed group but the newest n completes
inline void cp_async_wait(int n) {
  Fiber& f = S().fibers[S().cur];
  while ((int)f.groups.size() > n) {
    for (const PendingCopy& c : f.groups.front()) {
      unsigned char* d = static_cast<unsigned char*>(c.dst);
      if (c.src_bytes > 0) std::memcpy(d, c.src, c.src_bytes);
      std::memset(d + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    f.groups.erase(f.groups.begin());
  }
}

// ---- warp collectives -----------------------------------------------------------------
template <typename T>
inline T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) == 4, "emu shfl: 32-bit only");
  WarpScratch& w = warp();
  int l = lane();
  uint32_t bits; std::memcpy(&bits, &v, 4);
  w.shfl[l] = bits;
  syncwarp();
  uint32_t o = w.shfl[(l ^ mask) & 31];
  syncwarp();
  T r; std::memcpy(&r, &o, 4);
  return r;
}
template <typename T>
inline T shfl_down(T v, int delta) {
  WarpScratch& w = warp();
  int l = lane();
  uint32_t bits; std::memcpy(&bits, &v, 4);
  w.shfl[l] = bits;
  syncwarp();
  int src = l + delta;
  uint32_t o = src < 32 ? w.shfl[src] : bits;
  syncwarp();
  T r; std::memcpy(&r, &o, 4);
  return r;
}

inline float h2f(uint16_t h, bool bf16) {
  if (bf16) { uint32_t u = (uint32_t)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
  __half x; std::memcpy(&x, &h, 2); return __half2float(x);
}
inline float tf32_trunc(uint32_t u) { u &= 0xFFFFE000u; float f; std::memcpy(&f, &u, 4); return f; }

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32
inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], bool bf16) {
  WarpScratch& w = warp();
  int l = lane();
  for (int i = 0; i < 4; ++i) { w.a[l][i] = a[i]; w.c[l][i] = c[i]; }
  w.b[l][0] = b[0]; w.b[l][1] = b[1];
  syncwarp();
  auto A = [&](int m, int k) {
    int ln = (m % 8) * 4 + (k % 8) / 2, reg = (m / 8) + 2 * (k / 8);
    uint32_t v = w.a[ln][reg];
    return h2f((uint16_t)((k & 1) ? (v >> 16) : (v & 0xFFFF)), bf16);
  };
  auto Bv = [&](int k, int n) {
    int ln = n * 4 + (k % 8) / 2, reg = k / 8;
    uint32_t v = w.b[ln][reg];
    return h2f((uint16_t)((k & 1) ? (v >> 16) : (v & 0xFFFF)), bf16);
  };
  int g = l / 4, t = l % 4;
  float out[4];
  for (int r = 0; r < 4; ++r) {
    int m = g + 8 * (r / 2), n = 2 * t + (r % 2);
    double acc = c[r];
    for (int k = 0; k < 16; ++k) acc += (double)A(m, k) * (double)Bv(k, n);
    out[r] = (float)acc;
  }
  syncwarp();
  for (int r = 0; r < 4; ++r) d[r] = out[r];
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
inline void mma_1688_tf32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  WarpScratch& w = warp();
  int l = lane();
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
  w.b[l][0] = b[0]; w.b[l][1] = b[1];
  syncwarp();
  auto A = [&](int m, int k) { return tf32_trunc(w.a[(m % 8) * 4 + k % 4][m / 8 + 2 * (k / 4)]); };
  auto Bv = [&](int k, int n) { return tf32_trunc(w.b[n * 4 + k % 4][k / 4]); };
  int g = l / 4, t = l % 4;
  float out[4];
  for (int r = 0; r < 4; ++r) {
    int m = g + 8 * (r / 2), n = 2 * t + (r % 2);
    double acc = c[r];
    for (int k = 0; k < 8; ++k) acc += (double)A(m, k) * (double)Bv(k, n);
    out[r] = (float)acc;
  }
  syncwarp();
  for (int r = 0; r < 4; ++r) d[r] = out[r];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16
inline void ldmatrix_x4(uint32_t r[4], const void* row_addr, bool trans) {
  WarpScratch& w = warp();
  int l = lane();
  if (((uintptr_t)row_addr & 15) != 0) throw std::runtime_error("emu: ldmatrix row address not 16-byte aligned");
  w.addr[l] = row_addr;
  syncwarp();
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      int row, col;
      if (!trans) { row = l / 4; col = 2 * (l % 4) + h; }
      else { row = 2 * (l % 4) + h; col = l / 4; }
      const uint16_t* p = (const uint16_t*)w.addr[i * 8 + row];
      e[h] = p[col];
    }
    r[i] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
  }
  syncwarp();
}

inline uint32_t cvt_rna_tf32(float x) {
  uint32_t u; std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) {  // finite: round to nearest, ties away from zero
    u += 0x1000u;
  }
  return u & 0xFFFFE000u;
}

}  // namespace emu

#define threadIdx (::emu::tIdx())
#define blockIdx (::emu::bIdx())
#define blockDim (::emu::bDim())
#define gridDim (::emu::gDim())
#define __syncthreads() ::emu::syncthreads()
#define __syncwarp(...) ::emu::syncwarp()
template <typename T> inline T __ldg(const T* p) { return *p; }
inline unsigned int __float_as_uint(float x) { unsigned int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned int u) { float x; std::memcpy(&x, &u, 4); return x; }
// round-to-nearest fp32 arithmetic that the device compiler never contracts into an FMA (host x86-64: plain ops)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fadd_rn(float a, float b) { return a + b; }
