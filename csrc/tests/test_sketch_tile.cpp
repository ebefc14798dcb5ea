// Tests of the torch-free sketch tile arithmetic (run by ctest): column pairs
// against single entries, tile fills, the flat-index tiling, per-row-gradient
// tiles, and a tile-by-tile sketch against the literal double sum.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "sven_ext/sketch_tile.h"

namespace {

using sven_ext::Distribution;

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

const Distribution kDistributions[] = {Distribution::kGaussian, Distribution::kRademacher};

void test_random_pair_is_two_entries() {
  for (Distribution dist : kDistributions) {
    bool same = true;
    for (uint64_t row : {uint64_t{0}, uint64_t{1}, uint64_t{77}, (uint64_t{1} << 32) + 5, ~uint64_t{0} - 3})
      for (uint64_t pair = 0; pair < 40; ++pair) {
        const sven_ext::EntryPair e = sven_ext::random_pair(dist, 0x1234abcdULL, 9, row, pair);
        same = same && e.even == sven_ext::random_entry(dist, 0x1234abcdULL, 9, row, 2 * pair) &&
               e.odd == sven_ext::random_entry(dist, 0x1234abcdULL, 9, row, 2 * pair + 1);
      }
    expect(same, "random_pair gives random_entry of both columns, bitwise");
  }
}

void test_fill_random_rows() {
  for (Distribution dist : kDistributions)
    for (int64_t cols : {1, 2, 7, 8, 21}) {
      const int64_t rows = 9, ld = cols + 3, first_row = 1000;
      std::vector<double> out(static_cast<size_t>(rows * ld), 99.0);
      std::vector<float> out32(static_cast<size_t>(rows * ld), 99.0f);
      sven_ext::fill_random_rows(dist, 5, 2, first_row, rows, cols, out.data(), ld);
      sven_ext::fill_random_rows(dist, 5, 2, first_row, rows, cols, out32.data(), ld);
      bool same = true, untouched = true;
      for (int64_t k = 0; k < rows; ++k) {
        for (int64_t j = 0; j < cols; ++j) {
          const double want = sven_ext::random_entry(dist, 5, 2, first_row + k, j);
          same = same && out[k * ld + j] == want && out32[k * ld + j] == static_cast<float>(want);
        }
        for (int64_t j = cols; j < ld; ++j) untouched = untouched && out[k * ld + j] == 99.0;
      }
      expect(same, "fill_random_rows writes random_entry, rounded once");
      expect(untouched, "fill_random_rows leaves the padding of each row alone");
    }
}

void test_philox_pair_words() {
  for (int64_t pairs : {1, 3, 8, 11}) {
    const int64_t rows = 5, n = rows * pairs;
    const uint64_t first_row = (uint64_t{1} << 32) - 2;  // crosses into the row's high word
    std::vector<uint32_t> words(static_cast<size_t>(4 * n));
    sven_ext::philox_pair_words(99, 4, first_row, rows, pairs, words.data());
    bool same = true;
    for (int64_t k = 0; k < rows; ++k)
      for (int64_t m = 0; m < pairs; ++m) {
        const sven_ext::PhiloxWords x = sven_ext::philox_entry_words(99, 4, first_row + k, 2 * m + 1);
        for (int w = 0; w < 4; ++w) same = same && words[w * n + k * pairs + m] == x.w[w];
      }
    expect(same, "philox_pair_words lays out the words of each column pair");
  }
}

void test_tiling() {
  for (int64_t d_in : {1, 5, 37})
    for (int64_t d_out : {1, 3, 19})
      for (int64_t tile : {1, 4, 37, 64, 1000}) {
        const sven_ext::SketchTiling t = sven_ext::make_sketch_tiling(d_in, d_out, tile);
        int64_t next = 0;
        bool contiguous = true;
        for (int64_t q = 0; q < t.tiles(); ++q) {
          contiguous = contiguous && t.begin(q) == next && t.size(q) >= 1 && t.size(q) <= tile;
          next = t.begin(q) + t.size(q);
        }
        expect(contiguous && next == d_in * d_out, "tiles cover [0, P) in order, each once");
        bool index_ok = true;
        for (int64_t p = 0; p < d_in * d_out; ++p) {
          const sven_ext::ParamIndex pi = sven_ext::param_index(p, d_in);
          index_ok = index_ok && pi.o * d_in + pi.i == p && pi.i >= 0 && pi.i < d_in && pi.o < d_out;
        }
        expect(index_ok, "param_index inverts o * d_in + i");
      }
}

struct Factors {
  int64_t rows, steps, d_in, d_out;
  std::vector<double> a, d;

  // G_r[o, i] = sum_t d[r, t, o] a[r, t, i], literally.
  double gradient(int64_t r, int64_t o, int64_t i) const {
    double sum = 0.0;
    for (int64_t t = 0; t < steps; ++t) sum += d[(r * steps + t) * d_out + o] * a[(r * steps + t) * d_in + i];
    return sum;
  }
};

Factors random_factors(int64_t rows, int64_t steps, int64_t d_in, int64_t d_out, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  Factors f{rows, steps, d_in, d_out, std::vector<double>(static_cast<size_t>(rows * steps * d_in)),
            std::vector<double>(static_cast<size_t>(rows * steps * d_out))};
  for (double& x : f.a) x = normal(rng);
  for (double& x : f.d) x = normal(rng);
  return f;
}

void test_gradient_tile() {
  std::mt19937_64 rng(7);
  struct Shape {
    int64_t rows, steps, d_in, d_out;
  };
  for (const Shape& s : {Shape{1, 1, 1, 1}, Shape{3, 1, 5, 3}, Shape{4, 3, 37, 2}, Shape{2, 5, 1, 19}, Shape{5, 2, 7, 6}}) {
    const Factors f = random_factors(s.rows, s.steps, s.d_in, s.d_out, rng);
    const int64_t params = s.d_in * s.d_out;
    // Tiles starting anywhere, crossing several outputs, to the end.
    for (int64_t p0 : {int64_t{0}, int64_t{1}, params / 2, params - 1})
      for (int64_t count : {int64_t{1}, int64_t{3}, params - p0}) {
        if (p0 + count > params) continue;
        const int64_t ldg = count + 2;
        std::vector<double> g(static_cast<size_t>(s.rows * ldg), -7.0);
        sven_ext::gradient_tile(f.a.data(), f.d.data(), s.rows, s.steps, s.d_in, s.d_out, p0, count, g.data(), ldg);
        bool close = true;
        for (int64_t r = 0; r < s.rows; ++r) {
          for (int64_t k = 0; k < count; ++k) {
            const sven_ext::ParamIndex pi = sven_ext::param_index(p0 + k, s.d_in);
            const double want = f.gradient(r, pi.o, pi.i);
            close = close && std::fabs(g[r * ldg + k] - want) <= 1e-13 * (1.0 + std::fabs(want));
          }
          close = close && g[r * ldg + count] == -7.0;
        }
        expect(close, "gradient_tile equals the per-row gradient's entries");
      }
  }
  // A block of rows that starts inside the factors: the pointers carry the offset.
  const Factors f = random_factors(6, 2, 4, 3, rng);
  std::vector<double> g(static_cast<size_t>(2 * 12));
  sven_ext::gradient_tile(f.a.data() + 3 * 2 * 4, f.d.data() + 3 * 2 * 3, 2, 2, 4, 3, 0, 12, g.data(), 12);
  bool close = true;
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t p = 0; p < 12; ++p) close = close && std::fabs(g[r * 12 + p] - f.gradient(3 + r, p / 4, p % 4)) < 1e-13;
  expect(close, "gradient_tile on a block of rows");
}

// Y = G Omega tile by tile, the way the CPU kernel walks it (fill_random_rows for the
// tile's rows of Omega, gradient_tile for blocks of rows), against the literal sum.
void test_tiled_sketch() {
  std::mt19937_64 rng(11);
  struct Shape {
    int64_t rows, steps, d_in, d_out, cols, tile, row_block;
  };
  const uint64_t seed = 42, row_offset = 12345;
  const uint32_t stream = 3;
  for (Distribution dist : kDistributions)
    for (const Shape& s : {Shape{1, 1, 1, 1, 1, 1, 1}, Shape{7, 3, 5, 3, 7, 4, 3}, Shape{5, 2, 37, 2, 21, 16, 2},
                           Shape{3, 1, 4, 19, 6, 100, 8}}) {
      const Factors f = random_factors(s.rows, s.steps, s.d_in, s.d_out, rng);
      const sven_ext::SketchTiling tiling = sven_ext::make_sketch_tiling(s.d_in, s.d_out, s.tile);
      std::vector<double> y(static_cast<size_t>(s.rows * s.cols), 0.0);
      std::vector<double> w(static_cast<size_t>(tiling.tile * s.cols)), g(static_cast<size_t>(s.row_block * tiling.tile));
      for (int64_t q = 0; q < tiling.tiles(); ++q) {
        const int64_t p0 = tiling.begin(q), count = tiling.size(q);
        sven_ext::fill_random_rows(dist, seed, stream, row_offset + p0, count, s.cols, w.data(), s.cols);
        for (int64_t r0 = 0; r0 < s.rows; r0 += s.row_block) {
          const int64_t n = std::min(s.row_block, s.rows - r0);
          sven_ext::gradient_tile(f.a.data() + r0 * s.steps * s.d_in, f.d.data() + r0 * s.steps * s.d_out, n, s.steps,
                                  s.d_in, s.d_out, p0, count, g.data(), count);
          for (int64_t r = 0; r < n; ++r)
            for (int64_t j = 0; j < s.cols; ++j) {
              double sum = 0.0;
              for (int64_t k = 0; k < count; ++k) sum += g[r * count + k] * w[k * s.cols + j];
              y[(r0 + r) * s.cols + j] += sum;
            }
        }
      }
      double err = 0.0, scale = 0.0;
      for (int64_t r = 0; r < s.rows; ++r)
        for (int64_t j = 0; j < s.cols; ++j) {
          double want = 0.0, abs_sum = 0.0;
          for (int64_t o = 0; o < s.d_out; ++o)
            for (int64_t i = 0; i < s.d_in; ++i) {
              const double term =
                  f.gradient(r, o, i) * sven_ext::random_entry(dist, seed, stream, row_offset + o * s.d_in + i, j);
              want += term;
              abs_sum += std::fabs(term);
            }
          err = std::fmax(err, std::fabs(y[r * s.cols + j] - want));
          scale = std::fmax(scale, abs_sum);
        }
      expect(err <= 1e-13 * scale, "tile-by-tile sketch equals the literal sum");
    }
}

}  // namespace

int main() {
  test_random_pair_is_two_entries();
  test_fill_random_rows();
  test_philox_pair_words();
  test_tiling();
  test_gradient_tile();
  test_tiled_sketch();
  if (failures == 0) std::printf("test_sketch_tile: all checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
