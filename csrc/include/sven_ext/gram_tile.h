// Tile arithmetic of the Gram kernels (seq_gram, embedding_gram), shared by the
// CPU and CUDA impls so both cut the work the same way.
//
// The kernels reduce, for every pair of samples (i, j), a T x T matrix of
// products S[t, t'] over all (t, t'), without ever holding the T x T matrices of
// all pairs. Samples are grouped into tiles of `samples_per_tile` samples; the
// time axis of each sample is cut into chunks of `step_chunk` steps. A tile
// therefore covers at most samples_per_tile * step_chunk <= tile_rows rows of
// the flattened (B * T, features) factors, and
//   - either step_chunk == T (whole samples, several per tile: short sequences),
//   - or samples_per_tile == 1 (one sample, cut into chunks: long sequences).
// Work is the upper triangle of tile pairs (tile_i <= tile_j) times every pair
// of chunks; each K[i, j] with i <= j is owned by exactly one tile pair.
//
// Torch-free; the CMake core tests it without torch (csrc/tests/test_gram_tile.cpp).
#pragma once

#include <cstdint>
#include <math.h>

#include "sven_ext/macros.h"

namespace sven_ext {

struct GramTiling {
  int64_t samples;           // B
  int64_t steps;             // T
  int64_t samples_per_tile;  // S >= 1
  int64_t step_chunk;        // steps per chunk, 1 <= step_chunk <= T (1 when T == 0)
  int64_t tiles;             // ceil(B / S)

  SVEN_HOST_DEVICE int64_t chunks() const { return (steps + step_chunk - 1) / step_chunk; }

  SVEN_HOST_DEVICE int64_t tile_pairs() const { return tiles * (tiles + 1) / 2; }

  // Samples actually present in tile `tile` (the last tile may be short).
  SVEN_HOST_DEVICE int64_t samples_in_tile(int64_t tile) const {
    const int64_t first = tile * samples_per_tile;
    const int64_t left = samples - first;
    return left < samples_per_tile ? left : samples_per_tile;
  }

  // Steps actually present in the chunk that starts at step t0.
  SVEN_HOST_DEVICE int64_t steps_in_chunk(int64_t t0) const {
    const int64_t left = steps - t0;
    return left < step_chunk ? left : step_chunk;
  }

  // The flattened row (sample * T + step) behind row r of the tile whose first
  // sample is `first_sample`, for the chunk starting at step t0; -1 when r is
  // padding (past the last sample, past the last step, or past the tile).
  SVEN_HOST_DEVICE int64_t row(int64_t first_sample, int64_t t0, int64_t r) const {
    const int64_t local_sample = r / step_chunk;
    const int64_t t = t0 + (r - local_sample * step_chunk);
    const int64_t sample = first_sample + local_sample;
    if (local_sample >= samples_per_tile || sample >= samples || t >= steps) return -1;
    return sample * steps + t;
  }
};

// Tiles of at most tile_rows rows: whole samples when they fit, chunks of one
// sample otherwise.
inline GramTiling make_gram_tiling(int64_t samples, int64_t steps, int64_t tile_rows) {
  GramTiling g{};
  g.samples = samples;
  g.steps = steps;
  if (steps <= 0) {
    g.samples_per_tile = tile_rows;
    g.step_chunk = 1;
  } else if (steps <= tile_rows) {
    g.samples_per_tile = tile_rows / steps;
    g.step_chunk = steps;
  } else {
    g.samples_per_tile = 1;
    g.step_chunk = tile_rows;
  }
  g.tiles = (samples + g.samples_per_tile - 1) / g.samples_per_tile;
  return g;
}

struct TrianglePair {
  int64_t first;   // <= second
  int64_t second;
};

// The p-th pair (first <= second) of the upper triangle, in the order
// (0,0), (0,1), (1,1), (0,2), (1,2), (2,2), ...: second is the largest s with
// s (s + 1) / 2 <= p. The square root gives a guess; integer steps make it exact.
SVEN_HOST_DEVICE SVEN_INLINE TrianglePair triangle_pair(int64_t p) {
  int64_t s = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) * 0.5);
  while (s > 0 && s * (s + 1) / 2 > p) --s;
  while ((s + 1) * (s + 2) / 2 <= p) ++s;
  return TrianglePair{p - s * (s + 1) / 2, s};
}

// sum_k x[k] * y[k] accumulated in float64 (four partial sums, so the compiler
// can keep them in vector lanes), whatever the input precision.
template <typename X, typename Y>
inline double hadamard_sum(const X* x, const Y* y, int64_t n) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    for (int q = 0; q < 4; ++q) acc[q] += static_cast<double>(x[k + q]) * static_cast<double>(y[k + q]);
  }
  for (; k < n; ++k) acc[0] += static_cast<double>(x[k]) * static_cast<double>(y[k]);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

}  // namespace sven_ext
