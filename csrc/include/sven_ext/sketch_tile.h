// Tile arithmetic of the Linear-layer sketch kernels (linear_sketch,
// linear_project), shared by the CPU and CUDA impls so both cut the work the
// same way and read the same random numbers.
//
// Row r of a Linear layer's Jacobian is its per-row gradient
// G_r = d_r^T a_r (d_out x d_in, summed over the T steps), flattened row-major:
// parameter (o, i) has the flat index p = o * d_in + i. The kernels compute
//   Y[r, j] = sum_p G_r[p] * W[p, j]
// with W either the virtual random matrix Omega (rows row_offset + p) or a
// stored (P, s) matrix Z, without holding G or Omega whole: the flat parameter
// range [0, P) is cut into tiles of consecutive indices; per tile, the tile's
// rows of W (tile x cols) and a block of rows' G tile (rows x tile) are formed
// in a cache- or shared-memory-sized buffer and multiplied. A tile of
// consecutive flat indices crosses at most a few output features o, each a
// contiguous run of inputs i (a "segment"), so G tiles are formed by
// contiguous, vectorisable loops over a's rows.
//
// Random columns come in pairs: one Philox call gives the entries of columns
// 2m and 2m + 1 (sven_ext/philox.h), so a tile is filled with one call per
// pair, and both Box-Muller outputs are used.
//
// Torch-free; the CMake core tests it without torch (csrc/tests/test_sketch_tile.cpp).
#pragma once

#include <cstdint>

#include "sven_ext/macros.h"
#include "sven_ext/philox.h"

namespace sven_ext {

// Entries (row, 2 * pair) and (row, 2 * pair + 1) of the virtual matrix (seed, stream),
// from one Philox call: bitwise random_entry() of each column.
struct EntryPair {
  double even;
  double odd;
};

SVEN_HOST_DEVICE SVEN_INLINE EntryPair random_pair(Distribution dist, uint64_t seed, uint32_t stream, uint64_t row,
                                                   uint64_t pair) {
  const PhiloxWords x = philox_entry_words(seed, stream, row, 2 * pair);
  if (dist == Distribution::kGaussian) {
    const GaussianPair g = gaussian_pair(x);
    return EntryPair{g.even, g.odd};
  }
  return EntryPair{(x.w[0] & 1u) ? 1.0 : -1.0, (x.w[1] & 1u) ? 1.0 : -1.0};
}

// out[k * ld + j] = Omega[first_row + k, j] for k < rows, j < cols (columns from 0),
// rounded once to out_t. One Philox call per pair of columns.
template <typename out_t>
inline void fill_random_rows(Distribution dist, uint64_t seed, uint32_t stream, uint64_t first_row, int64_t rows,
                             int64_t cols, out_t* out, int64_t ld) {
  const int64_t full_pairs = cols / 2;
  for (int64_t k = 0; k < rows; ++k) {
    const uint64_t row = first_row + static_cast<uint64_t>(k);
    out_t* out_row = out + k * ld;
    for (int64_t m = 0; m < full_pairs; ++m) {
      const EntryPair e = random_pair(dist, seed, stream, row, static_cast<uint64_t>(m));
      out_row[2 * m] = static_cast<out_t>(e.even);
      out_row[2 * m + 1] = static_cast<out_t>(e.odd);
    }
    if (cols & 1) out_row[cols - 1] = static_cast<out_t>(random_pair(dist, seed, stream, row, full_pairs).even);
  }
}

// The Philox words of entries (first_row + k, 2m) and (first_row + k, 2m + 1) for
// k < rows, m < pairs, pair index n = k * pairs + m: words[w * rows * pairs + n] is
// word w of philox_entry_words. The portable definition of a tile's words; the CPU
// kernel has an AVX2 twin that must give the same bits.
inline void philox_pair_words(uint64_t seed, uint32_t stream, uint64_t first_row, int64_t rows, int64_t pairs,
                              uint32_t* words) {
  const int64_t n = rows * pairs;
  for (int64_t k = 0; k < rows; ++k)
    for (int64_t m = 0; m < pairs; ++m) {
      const PhiloxWords x =
          philox_entry_words(seed, stream, first_row + static_cast<uint64_t>(k), 2 * static_cast<uint64_t>(m));
      for (int w = 0; w < 4; ++w) words[w * n + k * pairs + m] = x.w[w];
    }
}

// The flat parameter range [0, P) in tiles of `tile` consecutive indices.
struct SketchTiling {
  int64_t d_in;
  int64_t d_out;
  int64_t params;  // P = d_in * d_out
  int64_t tile;    // >= 1

  SVEN_HOST_DEVICE int64_t tiles() const { return (params + tile - 1) / tile; }
  SVEN_HOST_DEVICE int64_t begin(int64_t q) const { return q * tile; }
  SVEN_HOST_DEVICE int64_t size(int64_t q) const {
    const int64_t left = params - q * tile;
    return left < tile ? left : tile;
  }
};

inline SketchTiling make_sketch_tiling(int64_t d_in, int64_t d_out, int64_t tile) {
  return SketchTiling{d_in, d_out, d_in * d_out, tile < 1 ? 1 : tile};
}

// The output feature o and input feature i of flat parameter p.
struct ParamIndex {
  int64_t o;
  int64_t i;
};

SVEN_HOST_DEVICE SVEN_INLINE ParamIndex param_index(int64_t p, int64_t d_in) {
  const int64_t o = p / d_in;
  return ParamIndex{o, p - o * d_in};
}

// g[r * ldg + k] = G_r[p0 + k] = sum_t d[r, t, o] * a[r, t, i] for r < rows, k < count,
// where (o, i) = param_index(p0 + k). a: (rows, steps, d_in) and d: (rows, steps, d_out),
// row-major, pointing at the block's first row. Products and the sum over t in acc_t.
// The tile is walked one segment (one o, a run of i) at a time, in blocks of
// kGradientLanes consecutive i whose sums stay in registers over t: each block of G is
// written once, and the inner loop is a fixed-length, vectorisable scaled add of a row
// of a.
constexpr int64_t kGradientLanes = 16;

template <typename scalar_t, typename acc_t>
inline void gradient_tile(const scalar_t* a, const scalar_t* d, int64_t rows, int64_t steps, int64_t d_in,
                          int64_t d_out, int64_t p0, int64_t count, acc_t* g, int64_t ldg) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* a_r = a + r * steps * d_in;
    const scalar_t* d_r = d + r * steps * d_out;
    acc_t* g_row = g + r * ldg;
    for (int64_t k0 = 0; k0 < count;) {
      const ParamIndex first = param_index(p0 + k0, d_in);
      const int64_t run = (d_in - first.i < count - k0) ? d_in - first.i : count - k0;
      const scalar_t* a_seg = a_r + first.i;
      const scalar_t* d_seg = d_r + first.o;
      acc_t* dst = g_row + k0;
      int64_t k = 0;
      for (; k + kGradientLanes <= run; k += kGradientLanes) {
        acc_t sum[kGradientLanes] = {};
        for (int64_t t = 0; t < steps; ++t) {
          const acc_t scale = static_cast<acc_t>(d_seg[t * d_out]);
          const scalar_t* src = a_seg + t * d_in + k;
          for (int64_t q = 0; q < kGradientLanes; ++q) sum[q] += scale * static_cast<acc_t>(src[q]);
        }
        for (int64_t q = 0; q < kGradientLanes; ++q) dst[k + q] = sum[q];
      }
      for (; k < run; ++k) {
        acc_t sum = acc_t(0);
        for (int64_t t = 0; t < steps; ++t)
          sum += static_cast<acc_t>(d_seg[t * d_out]) * static_cast<acc_t>(a_seg[t * d_in + k]);
        dst[k] = sum;
      }
      k0 += run;
    }
  }
}

}  // namespace sven_ext
