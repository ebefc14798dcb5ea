// Tests of the torch-free Gram tile arithmetic (run by ctest): the triangle
// enumeration, the tiling's row map, and a tile-by-tile seq_gram built from
// them against the literal double sum.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "sven_ext/gram_tile.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

void test_triangle_pairs() {
  int64_t p = 0;
  bool ok = true;
  for (int64_t second = 0; second < 2000; ++second)
    for (int64_t first = 0; first <= second; ++first, ++p) {
      const sven_ext::TrianglePair tp = sven_ext::triangle_pair(p);
      ok = ok && tp.first == first && tp.second == second;
    }
  expect(ok, "triangle_pair enumerates (first <= second) in order");
  // Far out, where the square root's rounding matters: the exact bounds of a row.
  for (int64_t s : {int64_t{94906265}, int64_t{3037000499} / 2, int64_t{1} << 26}) {
    const int64_t row_start = s * (s + 1) / 2;
    sven_ext::TrianglePair tp = sven_ext::triangle_pair(row_start);
    expect(tp.second == s && tp.first == 0, "triangle_pair at a row start");
    tp = sven_ext::triangle_pair(row_start + s);
    expect(tp.second == s && tp.first == s, "triangle_pair at a row end");
    tp = sven_ext::triangle_pair(row_start - 1);
    expect(tp.second == s - 1 && tp.first == s - 1, "triangle_pair before a row start");
  }
}

void test_tiling_shapes() {
  for (int64_t tile_rows : {int64_t{64}, int64_t{512}}) {
    for (int64_t samples : {1, 3, 7, 17, 200}) {
      for (int64_t steps : {1, 5, 13, 63, 64, 65, 200, 1000}) {
        const sven_ext::GramTiling g = sven_ext::make_gram_tiling(samples, steps, tile_rows);
        expect(g.samples_per_tile >= 1 && g.step_chunk >= 1, "tiles hold at least one row");
        expect(g.samples_per_tile * g.step_chunk <= tile_rows, "a tile fits tile_rows");
        expect(g.step_chunk == steps || g.samples_per_tile == 1, "whole samples or one sample per tile");
        expect(g.tiles * g.samples_per_tile >= samples && (g.tiles - 1) * g.samples_per_tile < samples,
               "tiles cover the samples");
        // Every (sample, step) row appears exactly once over tiles, chunks and tile rows.
        std::vector<int> seen(static_cast<size_t>(samples * steps), 0);
        bool in_range = true;
        for (int64_t tile = 0; tile < g.tiles; ++tile)
          for (int64_t t0 = 0; t0 < steps; t0 += g.step_chunk)
            for (int64_t r = 0; r < tile_rows; ++r) {
              const int64_t row = g.row(tile * g.samples_per_tile, t0, r);
              if (row < 0) continue;
              in_range = in_range && row < samples * steps;
              if (in_range) ++seen[static_cast<size_t>(row)];
            }
        bool once = in_range;
        for (int count : seen) once = once && count == 1;
        expect(once, "the row map covers every (sample, step) once");
      }
    }
  }
}

// K from the literal definition, in double.
std::vector<double> seq_gram_direct(const std::vector<double>& a, const std::vector<double>& d, int64_t b, int64_t t,
                                    int64_t da, int64_t dd) {
  std::vector<double> k(static_cast<size_t>(b * b), 0.0);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < b; ++j)
      for (int64_t s = 0; s < t; ++s)
        for (int64_t u = 0; u < t; ++u) {
          double sa = 0.0, sd = 0.0;
          for (int64_t f = 0; f < da; ++f) sa += a[(i * t + s) * da + f] * a[(j * t + u) * da + f];
          for (int64_t f = 0; f < dd; ++f) sd += d[(i * t + s) * dd + f] * d[(j * t + u) * dd + f];
          k[i * b + j] += sa * sd;
        }
  return k;
}

// K tile by tile, the way the kernels walk it: tile pairs of the upper
// triangle, chunk pairs, tile rows through GramTiling::row, hadamard_sum for
// the feature products.
std::vector<double> seq_gram_tiled(const std::vector<double>& a, const std::vector<double>& d, int64_t b, int64_t t,
                                   int64_t da, int64_t dd, int64_t tile_rows) {
  const sven_ext::GramTiling g = sven_ext::make_gram_tiling(b, t, tile_rows);
  std::vector<double> k(static_cast<size_t>(b * b), 0.0);
  for (int64_t p = 0; p < g.tile_pairs(); ++p) {
    const sven_ext::TrianglePair tiles = sven_ext::triangle_pair(p);
    const int64_t first_i = tiles.first * g.samples_per_tile, first_j = tiles.second * g.samples_per_tile;
    for (int64_t t0 = 0; t0 < t; t0 += g.step_chunk)
      for (int64_t u0 = 0; u0 < t; u0 += g.step_chunk)
        for (int64_t r = 0; r < tile_rows; ++r)
          for (int64_t c = 0; c < tile_rows; ++c) {
            const int64_t row = g.row(first_i, t0, r), col = g.row(first_j, u0, c);
            if (row < 0 || col < 0) continue;
            const int64_t i = row / t, j = col / t;
            if (i > j) continue;
            const double sa = sven_ext::hadamard_sum(&a[row * da], &a[col * da], da);
            const double sd = sven_ext::hadamard_sum(&d[row * dd], &d[col * dd], dd);
            k[i * b + j] += sa * sd;
          }
  }
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = i + 1; j < b; ++j) k[j * b + i] = k[i * b + j];
  return k;
}

void test_tiled_seq_gram() {
  std::mt19937_64 rng(12345);
  std::normal_distribution<double> normal;
  struct Shape {
    int64_t b, t, da, dd, tile_rows;
  };
  for (const Shape& s : {Shape{1, 1, 1, 1, 64}, Shape{3, 5, 3, 7, 8}, Shape{7, 13, 5, 2, 16}, Shape{5, 9, 4, 3, 4},
                         Shape{4, 3, 6, 5, 64}}) {
    std::vector<double> a(static_cast<size_t>(s.b * s.t * s.da)), d(static_cast<size_t>(s.b * s.t * s.dd));
    for (double& x : a) x = normal(rng);
    for (double& x : d) x = normal(rng);
    const std::vector<double> want = seq_gram_direct(a, d, s.b, s.t, s.da, s.dd);
    const std::vector<double> got = seq_gram_tiled(a, d, s.b, s.t, s.da, s.dd, s.tile_rows);
    double scale = 0.0, err = 0.0;
    for (size_t q = 0; q < want.size(); ++q) {
      scale = std::fmax(scale, std::fabs(want[q]));
      err = std::fmax(err, std::fabs(want[q] - got[q]));
    }
    expect(err <= 1e-12 * scale, "tile-by-tile seq_gram equals the direct sum");
  }
}

void test_hadamard_sum() {
  const float x[7] = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f};
  const double y[7] = {1.0, -1.0, 0.5, 0.25, 2.0, 0.0, 1e-3};
  expect(sven_ext::hadamard_sum(x, y, 7) == 1.0 - 2.0 + 1.5 + 1.0 + 10.0 + 0.0 + 7e-3, "hadamard_sum, odd length");
  expect(sven_ext::hadamard_sum(x, y, 0) == 0.0, "hadamard_sum, empty");
  // Float inputs accumulate in double: 2^24 + 1 is not a float but is a double.
  const float big[2] = {16777216.0f, 1.0f};
  const float ones[2] = {1.0f, 1.0f};
  expect(sven_ext::hadamard_sum(big, ones, 2) == 16777217.0, "hadamard_sum accumulates in double");
}

}  // namespace

int main() {
  test_triangle_pairs();
  test_tiling_shapes();
  test_tiled_seq_gram();
  test_hadamard_sum();
  if (failures == 0) std::printf("test_gram_tile: all checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
