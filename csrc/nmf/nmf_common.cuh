// Device building blocks shared by nmf_fwd.cu and nmf_bwd.cu (the CUDA NMF2D kernels; interface: nmf_params.h).
//
// Every product with a (D, N) matrix (x, g_Y) and every R x R product of the pass kernels runs on bf16 tensor cores
// (mma.sync m16n8k16, fp32 accumulation) over "pieces": a value v is split into NP bf16 pieces
// v = p0 + p1 (+ p2) (each piece the round-to-nearest of the remaining residual), and a product of two split
// operands sums the piece products (i, j) with i + j < L, where L is the precision level:
//   L = 2 (bf16/fp16 inputs, fp32 with allow_tf32): 16-bit significand per operand, relative error ~2^-17
//          (better than TF32); 3 mma per product (2 for bf16 x, which is one exact piece).
//   L = 3 (fp32 without TF32): 24-bit significand (exact for fp32 x), relative error ~2^-23; 6 mma.
// x itself: bf16 -> 1 piece (exact), fp16 -> 2 bf16 pieces (exact: 11 = 8 + 3 significant bits; bf16 instead of
// fp16 pieces because bf16 has fp32's exponent range, so no operand can overflow or flush), fp32 -> L pieces.
// Pieces live in shared memory as bf16 arrays [rows][cols + 8] (the pad makes ldmatrix rows 16-byte aligned and
// bank-conflict free), piece p at offset p * (rows * ld).
//
// Tile loads of x-like matrices go global -> registers (prefetched one D-chunk ahead) -> pieces in shared memory,
// in 16-byte items: mode 0 = items along n with one 16-byte load (unit n-stride, aligned), 1 = items along n with
// strided scalar loads, 2 = items along d with strided scalar loads (for x whose d-stride is the small one).
#pragma once

#include "common/cuda_common.cuh"
#include "nmf/nmf_params.h"

namespace nmf {

using namespace ::sk;
using bf16 = __nv_bfloat16;

constexpr int NTHR = 256;  // threads of every NMF kernel
constexpr int BD = 32;     // D-chunk of the pass kernels

#ifdef SEGNEXT_EMU
// the emulated device's opt-in shared memory per block (tests/helpers/emu/nmf_emu_main.cpp sets it)
inline int& emu_smem_limit() {
  static int v = 232448;
  return v;
}
#endif

template <typename T> struct XPieces;
template <> struct XPieces<float> { template <int L> static constexpr int n() { return L; } };
template <> struct XPieces<__half> { template <int L> static constexpr int n() { return 2; } };
template <> struct XPieces<bf16> { template <int L> static constexpr int n() { return 1; } };

template <typename T> struct IsB16 { static constexpr bool value = false; };
template <> struct IsB16<bf16> { static constexpr bool value = true; };

// Pass-kernel geometry for padded rank RP. The (BN x RP) products run on an 8-warp grid WM x WN, warp tile
// (16 MTW) x NW; BN = 16 MTW WM. The (BD x RP) products over the tile's n (x C, x g_A) use warp tiles 32 x NW and
// split the BN columns of the reduction into KS = WM slices of 16 MTW, reduced through shared memory.
template <int RP_, int MTW_>
struct Geo {
  static constexpr int RP = RP_;
  static constexpr int MTW = MTW_;
  static constexpr int WN = RP == 64 ? 2 : (RP == 128 ? 8 : 1);
  static constexpr int NW = RP / WN;
  static constexpr int NT = NW / 8;
  static constexpr int WM = 8 / WN;
  static constexpr int BN = 16 * MTW * WM;
  static constexpr int KS = WM;
  static constexpr int LDN = BN + 8;  // bf16 elements per row of an x tile
  static constexpr int LDR = RP + 8;  // bf16 elements per row of a (rows, RP) piece tile
  static constexpr int LDF = RP + 8;  // floats per row of a (rows, RP) fp32 tile
  // rows of the fp32 tile region that also holds the KS x BD reduction slices of chunk_partial
  static constexpr int FROWS = BN > KS * 32 ? BN : KS * 32;
  static_assert(RP == 16 || RP == 32 || RP == 64 || RP == 128, "RP");
  static_assert(NT % 2 == 0, "NT");
};

// host mirrors of Geo::BN and Geo::FROWS
inline int geo_bn(int RP, int MTW) {
  const int WN = RP == 64 ? 2 : (RP == 128 ? 8 : 1);
  return 16 * MTW * (8 / WN);
}
inline int geo_frows(int RP, int MTW) {
  const int WN = RP == 64 ? 2 : (RP == 128 ? 8 : 1);
  const int bn = geo_bn(RP, MTW), ks32 = (8 / WN) * 32;
  return bn > ks32 ? bn : ks32;
}

constexpr size_t align128(size_t b) { return (b + 127) / 128 * 128; }

// ------------------------------------------------------------------------------------------------------------------
// Splitting into bf16 pieces
// ------------------------------------------------------------------------------------------------------------------
template <int NP>
SK_DEV void split_bf(float v, bf16 (&pc)[NP]) {
  float r = v;
#pragma unroll
  for (int i = 0; i < NP; ++i) {
    pc[i] = __float2bfloat16_rn(r);
    if (i + 1 < NP) r = r - __bfloat162float(pc[i]);
  }
}

template <int NP>
SK_DEV void store_pieces(bf16* dst, size_t ps, float v) {
  bf16 pc[NP];
  split_bf<NP>(v, pc);
#pragma unroll
  for (int i = 0; i < NP; ++i) dst[i * ps] = pc[i];
}

// ------------------------------------------------------------------------------------------------------------------
// Warp tensor-core product over pieces: acc[mt][nt] (16 x 8 fragments; rows m0 + 16 mt, cols n0 + 8 nt) +=
// sum_{k in [k0, k1)} A[m][k] B[k][n], k1 - k0 a multiple of 16.
//   AT: A given transposed in shared memory (As[k][m]) else As[m][k]; BT: B given as Bs[k][n] else Bs[n][k].
//   NPA / NPB: pieces of A / B (piece stride pa / pb elements); pairs (i, j) with i + j < L are multiplied.
// ------------------------------------------------------------------------------------------------------------------
template <int MT, int NT, bool AT, bool BT, int NPA, int NPB, int L>
SK_DEV void warp_mma(float (&acc)[MT][NT][4], const bf16* As, int lda, size_t pa, int m0, const bf16* Bs, int ldb,
                     size_t pb, int n0, int k0, int k1) {
  static_assert(NT % 2 == 0, "NT must be even");
  const int lane = lane_id();
  const int r8 = lane & 7, mi = lane >> 3;
#pragma unroll 1
  for (int k = k0; k < k1; k += 16) {
    uint32_t a[NPA][MT][4];
#pragma unroll
    for (int p = 0; p < NPA; ++p)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const bf16* ptr;
        if (AT) ptr = As + p * pa + (size_t)(k + (mi >> 1) * 8 + r8) * lda + m0 + mt * 16 + (mi & 1) * 8;
        else ptr = As + p * pa + (size_t)(m0 + mt * 16 + (mi & 1) * 8 + r8) * lda + k + (mi >> 1) * 8;
        ldmatrix_x4<AT>(a[p][mt], ptr);
      }
#pragma unroll
    for (int q = 0; q < NPB; ++q) {
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        uint32_t bb[4];
        const bf16* ptr;
        if (BT) ptr = Bs + q * pb + (size_t)(k + (mi & 1) * 8 + r8) * ldb + n0 + jj * 16 + (mi >> 1) * 8;
        else ptr = Bs + q * pb + (size_t)(n0 + jj * 16 + (mi >> 1) * 8 + r8) * ldb + k + (mi & 1) * 8;
        ldmatrix_x4<BT>(bb, ptr);
        const uint32_t b0[2] = {bb[0], bb[1]};
        const uint32_t b1[2] = {bb[2], bb[3]};
#pragma unroll
        for (int p = 0; p < NPA; ++p) {
          if (p + q >= L) continue;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<true>(acc[mt][2 * jj], a[p][mt], b0);
            mma_16816<true>(acc[mt][2 * jj + 1], a[p][mt], b1);
          }
        }
      }
    }
  }
}

template <int MT, int NT>
SK_DEV void acc_zero(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
}

// fragment element (mt, nt, i) of a warp tile at (m0, n0): row m0 + 16 mt + g + 8 (i >> 1), col n0 + 8 nt + 2 t + (i & 1)
SK_DEV int frag_row(int m0, int mt, int i) { return m0 + 16 * mt + (lane_id() >> 2) + 8 * (i >> 1); }
SK_DEV int frag_col(int n0, int nt, int i) { return n0 + 8 * nt + 2 * (lane_id() & 3) + (i & 1); }

template <int MT, int NT>
SK_DEV void frag_to_smem(const float (&acc)[MT][NT][4], float* dst, int ld, int m0, int n0) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = frag_row(m0, mt, 2 * h), col = frag_col(n0, nt, 0);
        *reinterpret_cast<float2*>(dst + (size_t)row * ld + col) = make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
      }
}

template <int MT, int NT>
SK_DEV void frag_from_smem(float (&acc)[MT][NT][4], const float* src, int ld, int m0, int n0) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = frag_row(m0, mt, 2 * h), col = frag_col(n0, nt, 0);
        const float2 v = *reinterpret_cast<const float2*>(src + (size_t)row * ld + col);
        acc[mt][nt][2 * h] = v.x;
        acc[mt][nt][2 * h + 1] = v.y;
      }
}

// ------------------------------------------------------------------------------------------------------------------
// x-like tiles: ROWS (d) x COLS (n) of a (D, N) matrix with strides (sR, sC), zero outside (nr, nc).
// ------------------------------------------------------------------------------------------------------------------
template <typename T, int ROWS, int COLS>
struct TilePref {
  static constexpr int VEC = 16 / (int)sizeof(T);
  static constexpr int ITEMS = ROWS * COLS / VEC;
  static constexpr int PER = (ITEMS + NTHR - 1) / NTHR;
  static_assert(ROWS % VEC == 0 && COLS % VEC == 0, "tile");
  uint4 buf[PER];

  // item -> (row, col) of its first element; mode 2 items run along rows
  SK_DEV static void item_pos(int it, int mode, int& row, int& col) {
    if (mode == 2) {
      col = it / (ROWS / VEC);
      row = (it % (ROWS / VEC)) * VEC;
    } else {
      row = it / (COLS / VEC);
      col = (it % (COLS / VEC)) * VEC;
    }
  }

  // base points at element (r0, c0) of the matrix; nr / nc: valid rows / cols from there
  SK_DEV void load(const T* __restrict__ base, int64_t sR, int64_t sC, int nr, int nc, int mode) {
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int it = (int)threadIdx.x + k * NTHR;
      T* e = reinterpret_cast<T*>(&buf[k]);
      if (ITEMS % NTHR != 0 && it >= ITEMS) continue;
      int row, col;
      item_pos(it, mode, row, col);
      if (mode == 0 && row < nr && col + VEC <= nc) {
        buf[k] = __ldg(reinterpret_cast<const uint4*>(base + row * sR + col));
        continue;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int rr = mode == 2 ? row + j : row, cc = mode == 2 ? col : col + j;
        e[j] = (rr < nr && cc < nc) ? base[rr * sR + cc * sC] : from_f<T>(0.f);
      }
    }
  }

  // the loaded tile as NP bf16 pieces in s (row stride ld, piece stride ps)
  template <int NP>
  SK_DEV void store(bf16* s, int ld, size_t ps, int mode) const {
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int it = (int)threadIdx.x + k * NTHR;
      if (ITEMS % NTHR != 0 && it >= ITEMS) continue;
      const T* e = reinterpret_cast<const T*>(&buf[k]);
      int row, col;
      item_pos(it, mode, row, col);
      if (mode == 2) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) store_pieces<NP>(s + (size_t)(row + j) * ld + col, ps, to_f(e[j]));
      } else if (IsB16<T>::value && NP == 1) {
        *reinterpret_cast<uint4*>(s + (size_t)row * ld + col) = buf[k];
      } else {
        bf16 pc[NP][VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          bf16 q[NP];
          split_bf<NP>(to_f(e[j]), q);
#pragma unroll
          for (int p = 0; p < NP; ++p) pc[p][j] = q[p];
        }
#pragma unroll
        for (int p = 0; p < NP; ++p) {
          bf16* dst = s + p * ps + (size_t)row * ld + col;
          if (VEC == 8) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(pc[p]);
          else *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(pc[p]);
        }
      }
    }
  }
};

// Store a ROWS x COLS tile of T from shared memory (row stride ld) to a (D, N) matrix: same item modes.
template <typename T, int ROWS, int COLS>
SK_DEV void store_tile(const T* s, int ld, T* __restrict__ base, int64_t sR, int64_t sC, int nr, int nc, int mode) {
  using TP = TilePref<T, ROWS, COLS>;
  constexpr int VEC = TP::VEC;
  for (int it = (int)threadIdx.x; it < TP::ITEMS; it += NTHR) {
    int row, col;
    TP::item_pos(it, mode, row, col);
    if (mode == 0 && row < nr && col + VEC <= nc) {
      *reinterpret_cast<uint4*>(base + row * sR + col) = *reinterpret_cast<const uint4*>(s + (size_t)row * ld + col);
      continue;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int rr = mode == 2 ? row + j : row, cc = mode == 2 ? col : col + j;
      if (rr < nr && cc < nc) base[rr * sR + cc * sC] = s[(size_t)rr * ld + cc];
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Small fp32 matrices (rows of R floats, row stride lds) -> pieces [ROWS][RP] (zero outside nr x R).
// ------------------------------------------------------------------------------------------------------------------
template <int ROWS, int RP>
struct RowsPref {
  static constexpr int PER = (ROWS * RP + NTHR - 1) / NTHR;
  float buf[PER];
  SK_DEV void load(const float* __restrict__ src, int64_t lds, int nr, int R) {
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int e = (int)threadIdx.x + k * NTHR;
      const int row = e / RP, c = e % RP;
      buf[k] = (e < ROWS * RP && row < nr && c < R) ? __ldg(src + row * lds + c) : 0.f;
    }
  }
  template <int NP>
  SK_DEV void store(bf16* s, int ld, size_t ps) const {
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int e = (int)threadIdx.x + k * NTHR;
      if ((ROWS * RP) % NTHR != 0 && e >= ROWS * RP) continue;
      store_pieces<NP>(s + (size_t)(e / RP) * ld + e % RP, ps, buf[k]);
    }
  }
};

template <int ROWS, int RP, int NP>
SK_DEV void rows_to_pieces(const float* __restrict__ src, int64_t lds, int nr, int R, bf16* s, int ld, size_t ps) {
  for (int e = (int)threadIdx.x; e < ROWS * RP; e += NTHR) {
    const int row = e / RP, c = e % RP;
    const float v = (row < nr && c < R) ? __ldg(src + row * lds + c) : 0.f;
    store_pieces<NP>(s + (size_t)row * ld + c, ps, v);
  }
}

// fp32 tile [ROWS][ld] in shared memory -> pieces [ROWS][RP]
template <int ROWS, int RP, int NP>
SK_DEV void smem_to_pieces(const float* src, int ldf, bf16* s, int ld, size_t ps) {
  for (int e = (int)threadIdx.x; e < ROWS * RP; e += NTHR) {
    const int row = e / RP, c = e % RP;
    store_pieces<NP>(s + (size_t)row * ld + c, ps, src[(size_t)row * ldf + c]);
  }
}

// fp32 tile [ROWS][ldf] in shared memory -> rows [0, nr) x cols [0, R) of a contiguous (rows, R) global matrix
SK_DEV void smem_to_rows(const float* src, int ldf, float* __restrict__ dst, int nr, int R) {
  const int total = nr * R;
  for (int e = (int)threadIdx.x; e < total; e += NTHR) {
    const int row = e / R, c = e - row * R;
    dst[e] = src[(size_t)row * ldf + c];
  }
}

// ------------------------------------------------------------------------------------------------------------------
// The per-CTA partial of a (BD x RP) chunk product over the tile's columns (x C, x g_A, g_Y C): each warp (ks, wn)
// multiplies its KS-slice of the BN columns into a 32 x NW fragment, the slices are summed in shared memory in the
// fixed order ks = 0..KS-1 and added to (first tile: written over) rows [d0, d0 + BD) of the (D, RP) partial.
// xs: pieces [BD][LDN] of the x-like chunk; ws: pieces [BN][LDR] of the (BN, RP) right factor.
// Ends with the shared-memory reduction buffer read (the caller syncs before writing it again).
// ------------------------------------------------------------------------------------------------------------------
template <typename Gm, int NPX, int L>
SK_DEV void chunk_partial(const bf16* xs, size_t pxs, const bf16* ws, size_t pws, float* red, float* __restrict__ part,
                          int64_t d0, int64_t D, bool first) {
  const int warp = (int)threadIdx.x >> 5;
  const int ks = warp / Gm::WN, wn = warp % Gm::WN;
  float e[2][Gm::NT][4];
  acc_zero(e);
  warp_mma<2, Gm::NT, false, true, NPX, L, L>(e, xs, Gm::LDN, pxs, 0, ws, Gm::LDR, pws, wn * Gm::NW,
                                              ks * 16 * Gm::MTW, (ks + 1) * 16 * Gm::MTW);
  frag_to_smem(e, red + (size_t)ks * BD * Gm::LDF, Gm::LDF, 0, wn * Gm::NW);
  __syncthreads();
  constexpr int RP = Gm::RP;
  for (int i = (int)threadIdx.x; i < BD * RP; i += NTHR) {
    const int d = i / RP, r = i % RP;
    if (d0 + d >= D) continue;
    float s = red[(size_t)d * Gm::LDF + r];
#pragma unroll
    for (int k = 1; k < Gm::KS; ++k) s += red[((size_t)k * BD + d) * Gm::LDF + r];
    float* dst = part + (d0 + d) * RP + r;
    *dst = first ? s : *dst + s;
  }
}

// (RP x RP) partial of a product over the tile's BN rows: sum_n Lf[n][i] Rf[n][j] (pieces [BN][LDR] each), added to
// (first tile: written over) acc (row stride RP; shared or global memory, every element owned by one thread).
template <typename Gm, int L>
SK_DEV void rr_partial(const bf16* lf, const bf16* rf, size_t ps, float* acc, bool first) {
  constexpr int RP = Gm::RP, NB = RP / 16;
  const int warp = (int)threadIdx.x >> 5;
  for (int blk = warp; blk < NB * NB; blk += NTHR / 32) {
    const int bi = blk / NB, bj = blk % NB;
    float h[1][2][4];
    acc_zero(h);
    warp_mma<1, 2, true, true, L, L, L>(h, lf, Gm::LDR, ps, bi * 16, rf, Gm::LDR, ps, bj * 16, 0, Gm::BN);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float* dst = acc + (size_t)frag_row(bi * 16, 0, i) * RP + frag_col(bj * 16, nt, i);
        *dst = first ? h[0][nt][i] : *dst + h[0][nt][i];
      }
  }
}

// x-like tile load mode for a (B, D, N) tensor (see the header comment)
inline int tile_mode(const void* ptr, int64_t sB, int64_t sD, int64_t sN, int esize) {
  const bool al = ((uintptr_t)ptr % 16 == 0) && ((sB * esize) % 16 == 0) && ((sD * esize) % 16 == 0);
  if (sN == 1 && al) return 0;
  if (sN == 1) return 1;
  return (sD < sN) ? 2 : 1;
}

inline int next_pow2_rp(int R) {
  int rp = 16;
  while (rp < R) rp *= 2;
  return rp;
}

int smem_limit_bytes();

}  // namespace nmf
