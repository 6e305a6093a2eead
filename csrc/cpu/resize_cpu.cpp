// Bilinear resize forward on CPU (math, layouts and guarantees in resize_cpu.h; the vector row kernels, compiled
// here once per ISA, in resize_cpu_rows.h).
//
// Plan (host, once per call): per output row (y0, y1, wy0, wy1) and per output column (x0, x1, wx0, wx1), padded to
// whole 16-column groups; for the AVX-512 permute path per group a base column and the lanes' offsets from it.
// Tasks = (plane b * C + c, block of output rows), a partition of the shape only. Per output row:
//   tmp[0:W]   = wy0 * x[y0, :] + wy1 * x[y1, :]          (fp32 / fp64, L1)
//   out[0:OW]  = wx0 * tmp[x0] + wx1 * tmp[x1]
// float32 outputs of >= 4 MiB are written with non-temporal stores (straight from the registers when the row is
// vector-aligned, else through an L1 row buffer with aligned streaming for the row's middle), then fenced once per
// thread.

#include "resize_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu_alloc.h"
#include "cpu_isa.h"
#include "cpu_vec.h"

namespace segnext_cpu {
namespace resize {
namespace {

constexpr int64_t kGroup = 16;                 // columns per table group (the AVX-512 width)
constexpr int64_t kPad = 32;                   // readable floats after a row buffer (two-register window)
constexpr size_t kBigOutput = size_t(4) << 20;  // outputs from this size: own cached mapping, streaming stores
constexpr size_t kHugePage = size_t(2) << 20;
constexpr int64_t kTaskElems = 16384;          // output elements per task (rows per task = ceil(this / OW))

// ------------------------------------------------------------------------------------------------ index tables
// Whether ATen's CPU kernels evaluate `scale * (dst + 0.5) - 0.5` (area_pixel_compute_source_index) as one fused
// multiply-add: its upsample kernels are compiled per CPU capability, and the compiler contracts the expression in
// the builds for FMA targets (x86 "AVX2" / "AVX512"; the baseline "NO AVX" build has no FMA; other architectures
// have FMA in their baseline). A source coordinate rounded differently moves the weight by an ulp of the coordinate.
bool aten_fuses_source_index() {
  static const bool fused = at::get_cpu_capability() != "NO AVX";
  return fused;
}

// One axis, exactly as ATen's compute_source_index_and_lambda<scalar_t, opmath_t> with opmath_t = E.
template <class E>
struct Axis {
  std::vector<int32_t> i0, i1;
  std::vector<E> w0, w1;
};

template <class E>
Axis<E> axis_table(int64_t in, int64_t out, bool align_corners, int64_t padded) {
  Axis<E> a;
  a.i0.assign(padded, 0);
  a.i1.assign(padded, 0);
  a.w0.assign(padded, E(0));
  a.w1.assign(padded, E(0));
  // area_pixel_compute_scale<E>
  const E scale = align_corners ? (out > 1 ? static_cast<E>(in - 1) / (out - 1) : static_cast<E>(0))
                                : static_cast<E>(in) / out;
  for (int64_t o = 0; o < out; ++o) {
    int64_t i0, i1;
    E l0, l1;
    if (in == out) {
      i0 = i1 = o;
      l0 = E(1);
      l1 = E(0);
    } else {
      // area_pixel_compute_source_index<E>(scale, o, align_corners, /*cubic=*/false)
      E real;
      if (align_corners) {
        real = scale * o;
      } else {
        real = aten_fuses_source_index() ? std::fma(scale, o + static_cast<E>(0.5), -static_cast<E>(0.5))
                                         : scale * (o + static_cast<E>(0.5)) - static_cast<E>(0.5);
        real = real < static_cast<E>(0) ? E(0) : real;
      }
      // guard_index_and_lambda (floorf, as ATen, for both float and double)
      i0 = std::min(static_cast<int64_t>(floorf(real)), in - 1);
      l1 = std::min(std::max(real - i0, static_cast<E>(0)), static_cast<E>(1));
      i1 = i0 + (i0 < in - 1 ? 1 : 0);
      l0 = static_cast<E>(1.) - l1;
    }
    a.i0[o] = static_cast<int32_t>(i0);
    a.i1[o] = static_cast<int32_t>(i1);
    a.w0[o] = l0;
    a.w1[o] = l1;
  }
  return a;
}

// Columns of the horizontal lerp, padded to whole groups (padding lanes: index 0, weight 0).
template <class E>
struct Cols {
  int64_t OW = 0, groups = 0;
  Axis<E> ax;
  std::vector<int32_t> base, rel0, rel1;  // per group / per lane: x0 - base, x1 - base (AVX-512 permute path)
  bool perm_ok = false;                   // every group's x1 - base <= 31
};

template <class E>
Cols<E> cols_table(int64_t W, int64_t OW, bool align_corners) {
  Cols<E> c;
  c.OW = OW;
  c.groups = (OW + kGroup - 1) / kGroup;
  c.ax = axis_table<E>(W, OW, align_corners, c.groups * kGroup);
  c.base.assign(c.groups, 0);
  c.rel0.assign(c.groups * kGroup, 0);
  c.rel1.assign(c.groups * kGroup, 0);
  c.perm_ok = true;
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t j0 = g * kGroup, j1 = std::min(OW, j0 + kGroup);
    int32_t b = c.ax.i0[j0];
    for (int64_t j = j0; j < j1; ++j) b = std::min(b, c.ax.i0[j]);
    c.base[g] = b;
    for (int64_t j = j0; j < j1; ++j) {
      c.rel0[j] = c.ax.i0[j] - b;
      c.rel1[j] = c.ax.i1[j] - b;
      if (c.rel1[j] > 31) c.perm_ok = false;
    }
  }
  return c;
}

// Raw pointers of the column tables, what the row kernels read.
struct ColPtrs {
  int64_t OW, groups;
  const int32_t *x0, *x1, *base, *rel0, *rel1;
  const float *w0, *w1;
  bool perm_ok;
};

// -------------------------------------------------------------------------------------------- per-ISA row kernels
// The row kernels' table (what each does: resize_cpu_rows.h).
struct Kernels {
  void (*vrow_f32)(const float*, const float*, float, float, float*, int64_t);
  void (*vrow_bf16)(const c10::BFloat16*, const c10::BFloat16*, float, float, float*, int64_t);
  void (*hrow)(const float*, const ColPtrs&, float*, bool);
  void (*store_stream)(const float*, float*, int64_t);
  void (*to_bf16)(const float*, c10::BFloat16*, int64_t);
  int64_t vec_bytes;  // alignment / width of a streaming store; 0: no streaming stores
};

// Portable (scalar; the compiler may vectorise); also the float64 path.
template <class T, class E>
void vrow_generic(const T* r0, const T* r1, E w0, E w1, E* tmp, int64_t W) {
  for (int64_t i = 0; i < W; ++i) tmp[i] = static_cast<E>(r0[i]) * w0 + static_cast<E>(r1[i]) * w1;
}

template <class T, class E>
void hrow_generic(const E* tmp, const int32_t* x0, const int32_t* x1, const E* w0, const E* w1, T* out, int64_t OW) {
  for (int64_t j = 0; j < OW; ++j) out[j] = static_cast<T>(tmp[x0[j]] * w0[j] + tmp[x1[j]] * w1[j]);
}

void hrow_f32_generic(const float* tmp, const ColPtrs& c, float* out, bool) {
  hrow_generic<float, float>(tmp, c.x0, c.x1, c.w0, c.w1, out, c.OW);
}
void store_generic(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
void to_bf16_generic(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

const Kernels kGeneric{vrow_generic<float, float>, vrow_generic<c10::BFloat16, float>, hrow_f32_generic,
                       store_generic, to_bf16_generic, 0};

#if SEGNEXT_VEC_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace rows_avx2 {
#define SEGNEXT_RESIZE_ROWS 1
#include "resize_cpu_rows.h"
#undef SEGNEXT_RESIZE_ROWS
}  // namespace rows_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace rows_avx512 {
#define SEGNEXT_RESIZE_ROWS 2
#include "resize_cpu_rows.h"
#undef SEGNEXT_RESIZE_ROWS
}  // namespace rows_avx512
#pragma GCC pop_options
#endif  // SEGNEXT_VEC_X86

const Kernels& kernels() {
#if SEGNEXT_VEC_X86
  if (isa() == Isa::avx512) return rows_avx512::kernels;
  if (isa() == Isa::avx2) return rows_avx2::kernels;
#endif
  return kGeneric;
}

void store_fence() {
#if SEGNEXT_VEC_X86
  _mm_sfence();
#endif
}

// --------------------------------------------------------------------------------------------------------- tasks
struct Shape {
  int64_t planes, H, W, OH, OW;
  int64_t rows_per_task, blocks, tasks;
};

Shape task_shape(int64_t planes, int64_t H, int64_t W, int64_t OH, int64_t OW) {
  Shape s{planes, H, W, OH, OW, 0, 0, 0};
  s.rows_per_task = std::min(OH, std::max<int64_t>(1, (kTaskElems + OW - 1) / OW));
  s.blocks = (OH + s.rows_per_task - 1) / s.rows_per_task;
  s.tasks = planes * s.blocks;
  return s;
}

// row(buffers, plane, oy) for every output row, tasks in parallel; buffers = make_buffers() once per thread's range of
// tasks; a store fence after each range when `fence` (non-temporal stores are weakly ordered: drained before the
// parallel region ends).
template <class MakeBuffers, class Row>
void for_each_row(const Shape& s, bool fence, MakeBuffers make_buffers, Row row) {
  at::parallel_for(0, s.tasks, 1, [&](int64_t t0, int64_t t1) {
    auto buffers = make_buffers();
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t p = task / s.blocks, blk = task % s.blocks;
      const int64_t r0 = blk * s.rows_per_task, r1 = std::min(s.OH, r0 + s.rows_per_task);
      for (int64_t oy = r0; oy < r1; ++oy) row(buffers, p, oy);
    }
    if (fence) store_fence();
  });
}

// float32 / bfloat16 (T) through the per-ISA kernels, fp32 compute.
template <class T>
void resize_f32(const T* x, T* y, const Shape& s, bool align_corners, bool big) {
  const Kernels& k = kernels();
  const Axis<float> rows = axis_table<float>(s.H, s.OH, align_corners, s.OH);
  const Cols<float> cols = cols_table<float>(s.W, s.OW, align_corners);
  const ColPtrs cp{cols.OW, cols.groups, cols.ax.i0.data(), cols.ax.i1.data(), cols.base.data(), cols.rel0.data(),
                   cols.rel1.data(), cols.ax.w0.data(), cols.ax.w1.data(), cols.perm_ok};
  constexpr bool f32 = std::is_same_v<T, float>;
  const bool stream = f32 && big && k.vec_bytes > 0;
  const int64_t vec_elems = k.vec_bytes / static_cast<int64_t>(sizeof(float));
  const bool whole_vectors = vec_elems > 0 && s.OW % vec_elems == 0;
  // row buffers: tmp (a blended source row, kPad readable floats after it), obuf (an output row in fp32)
  struct Buffers {
    std::vector<float> tmp, obuf;
  };
  auto make_buffers = [&] {
    Buffers b{std::vector<float>(s.W + kPad + 16, 0.f), {}};
    if (!f32 || (stream && !whole_vectors)) b.obuf.assign(cols.groups * kGroup + 16, 0.f);
    return b;
  };
  for_each_row(s, stream, make_buffers, [&](Buffers& b, int64_t p, int64_t oy) {
    const T* r0 = x + p * s.H * s.W + static_cast<int64_t>(rows.i0[oy]) * s.W;
    const T* r1 = x + p * s.H * s.W + static_cast<int64_t>(rows.i1[oy]) * s.W;
    T* out = y + (p * s.OH + oy) * s.OW;
    float* tmp = b.tmp.data();
    if constexpr (f32) {
      k.vrow_f32(r0, r1, rows.w0[oy], rows.w1[oy], tmp, s.W);
      if (!stream) {
        k.hrow(tmp, cp, out, false);
      } else if (whole_vectors && reinterpret_cast<uintptr_t>(out) % static_cast<uintptr_t>(k.vec_bytes) == 0) {
        k.hrow(tmp, cp, out, true);
      } else {
        k.hrow(tmp, cp, b.obuf.data(), false);
        k.store_stream(b.obuf.data(), out, s.OW);
      }
    } else {
      k.vrow_bf16(r0, r1, rows.w0[oy], rows.w1[oy], tmp, s.W);
      k.hrow(tmp, cp, b.obuf.data(), false);
      k.to_bf16(b.obuf.data(), out, s.OW);
    }
  });
}

// float64: the portable path, fp64 throughout (gradcheck, references).
void resize_f64(const double* x, double* y, const Shape& s, bool align_corners) {
  const Axis<double> rows = axis_table<double>(s.H, s.OH, align_corners, s.OH);
  const Axis<double> cols = axis_table<double>(s.W, s.OW, align_corners, s.OW);
  auto make_buffers = [&] { return std::vector<double>(s.W); };
  for_each_row(s, false, make_buffers, [&](std::vector<double>& tmp, int64_t p, int64_t oy) {
    const double* xp = x + p * s.H * s.W;
    vrow_generic<double, double>(xp + rows.i0[oy] * s.W, xp + rows.i1[oy] * s.W, rows.w0[oy], rows.w1[oy],
                                 tmp.data(), s.W);
    hrow_generic<double, double>(tmp.data(), cols.i0.data(), cols.i1.data(), cols.w0.data(), cols.w1.data(),
                                 y + (p * s.OH + oy) * s.OW, s.OW);
  });
}

// ---------------------------------------------------------------------------------------------------- allocation
// A contiguous output; >= kBigOutput bytes on Linux: an anonymous mapping of its own (2 MiB aligned, whole 2 MiB
// units). When the tensor dies its mapping goes back to a small cache (at most the output-cache limit in all,
// set_output_cache_limit: SEGNEXT_CPU_OUTPUT_CACHE_MIB, default 512 MiB) that the next call of about the same size
// takes again, already faulted in: a fresh 157 MB output (SegNeXt's 150 logits at 512x512) pays its page faults, a
// cached one none (what ONNX Runtime's arena does): bench.model on the Xeon, fused SegNeXt-T 84.2 ms with the cache
// (3dd31e2), 123.6-125.2 without it (bench/results/output-cache-0/). The price is that the cached mapping stays
// resident between calls (docs/kernels.md, "Memory"). The mappings are
// not advised MADV_HUGEPAGE: with THP in "madvise" mode a fresh huge-page mapping stalled for hundreds of ms whenever
// no free huge pages were at hand (one-off timings: the first one in a process, and every call whose previous
// output was still alive; the demo's fused median in CI went from ~90 to 305 ms). NaN-filled when the tests'
// poisoning is on. *big: whether it is such a mapping.
#ifdef __linux__
std::atomic<size_t> g_cache_limit{size_t(512) << 20};

struct MappingCache {
  std::mutex mutex;
  std::vector<std::pair<void*, size_t>> free;  // (address, length)
  size_t bytes = 0;

  void give(void* p, size_t len) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (bytes + len <= g_cache_limit.load(std::memory_order_relaxed)) {
        free.emplace_back(p, len);
        bytes += len;
        return;
      }
    }
    munmap(p, len);
  }

  // Unmap the oldest cached mappings until at most `limit` bytes stay cached.
  void trim(size_t limit) {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mutex);
      while (bytes > limit && !free.empty()) {
        drop.push_back(free.front());
        bytes -= free.front().second;
        free.erase(free.begin());
      }
    }
    for (const auto& m : drop) munmap(m.first, m.second);
  }
};

MappingCache& mapping_cache() {
  static MappingCache* cache = new MappingCache();  // never destroyed: mappings outlive static destruction order
  return *cache;
}

// A fresh 2 MiB-aligned anonymous mapping of len bytes (a multiple of 2 MiB), populated writable (in parallel, torch's
// intra-op threads); nullptr on failure. Without the cache (one fresh 150 MiB output per call) fused SegNeXt-T ran
// 155.0 ms before this populating and 125.2 after, B 395.8 and 366.8 (bench.model, Xeon, 2 threads, back to back:
// bench/results/output-cache-0/, 21cf06e and e4b1dee; populating on one thread was in between, one-off).
void* map_aligned(size_t len) {
  void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
  const size_t head = aligned - start, tail = kHugePage - head;
  if (head > 0) munmap(raw, head);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + len), tail);
#ifdef MADV_POPULATE_WRITE
  // fault the whole mapping in now, both threads' halves at once (Linux >= 5.14; elsewhere the kernel refuses and the
  // stores fault it in): a fresh 150 MiB output in one call instead of ~38,000 single-page faults on first touch
  {
    const int64_t chunks = static_cast<int64_t>(len / kHugePage);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      madvise(reinterpret_cast<void*>(aligned + b * kHugePage), static_cast<size_t>(e - b) * kHugePage,
              MADV_POPULATE_WRITE);
    });
  }
#endif
  return reinterpret_cast<void*>(aligned);
}
#endif

at::Tensor alloc_output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool* big) {
  *big = false;
  int64_t numel = 1;
  for (int64_t d : sizes) numel *= d;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (nbytes >= kBigOutput) {
    *big = true;
#ifdef __linux__
    size_t len = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    MappingCache& cache = mapping_cache();
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(cache.mutex);
      for (size_t i = 0; i < cache.free.size(); ++i) {
        if (cache.free[i].second >= len && cache.free[i].second < 2 * len) {
          p = cache.free[i].first;
          len = cache.free[i].second;
          cache.bytes -= len;
          cache.free.erase(cache.free.begin() + static_cast<std::ptrdiff_t>(i));
          break;
        }
      }
    }
    if (p == nullptr) p = map_aligned(len);
    if (p != nullptr) {
      at::Tensor t = at::from_blob(p, sizes, [len](void* q) { mapping_cache().give(q, len); }, opts);
      if (poison_enabled()) t.fill_(std::numeric_limits<double>::quiet_NaN());
      return t;
    }
#endif
  }
  return empty_output(sizes, opts);
}

}  // namespace
}  // namespace resize

at::Tensor resize_bilinear_forward(const at::Tensor& x, int64_t out_h, int64_t out_w, bool align_corners) {
  TORCH_CHECK(x.defined(), "resize_bilinear_forward: x must be a defined tensor");
  TORCH_CHECK(x.device().is_cpu(), "resize_bilinear_forward: x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, "resize_bilinear_forward: x must be 4-D (B, C, H, W), got ", x.dim(), "-D with shape ",
              x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
              "resize_bilinear_forward: x must be float32, float64 or bfloat16, got ", dt);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C >= 1 && H >= 1 && W >= 1, "resize_bilinear_forward: x must have C, H, W >= 1 (B = 0 is fine), got "
              "shape ", x.sizes());
  TORCH_CHECK(out_h >= 1, "resize_bilinear_forward: out_h must be >= 1, got ", out_h);
  TORCH_CHECK(out_w >= 1, "resize_bilinear_forward: out_w must be >= 1, got ", out_w);
  TORCH_CHECK(H <= std::numeric_limits<int32_t>::max() && W <= std::numeric_limits<int32_t>::max(),
              "resize_bilinear_forward: x's H and W must fit in int32, got shape ", x.sizes());

  bool big = false;
  at::Tensor out = resize::alloc_output({B, C, out_h, out_w}, x.options(), &big);
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const resize::Shape s = resize::task_shape(B * C, H, W, out_h, out_w);
  if (dt == at::kFloat) {
    resize::resize_f32<float>(xc.data_ptr<float>(), out.data_ptr<float>(), s, align_corners, big);
  } else if (dt == at::kBFloat16) {
    resize::resize_f32<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), s, align_corners,
                                      big);
  } else {
    resize::resize_f64(xc.data_ptr<double>(), out.data_ptr<double>(), s, align_corners);
  }
  return out;
}

void set_output_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_output_cache_limit: bytes must be >= 0, got ", bytes);
#ifdef __linux__
  resize::g_cache_limit.store(static_cast<size_t>(bytes), std::memory_order_relaxed);
  resize::mapping_cache().trim(static_cast<size_t>(bytes));
#endif
}

int64_t output_cache_bytes() {
#ifdef __linux__
  resize::MappingCache& cache = resize::mapping_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return static_cast<int64_t>(cache.bytes);
#else
  return 0;
#endif
}

}  // namespace segnext_cpu
