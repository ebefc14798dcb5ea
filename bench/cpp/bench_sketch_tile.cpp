// Torch-free timings of the sketch kernels' building blocks (sven_ext/sketch_tile.h),
// one thread, portable (baseline x86-64) code: the Philox generation rate (one call
// after another, and philox_pair_words over a tile), Gaussian and Rademacher entries
// per second (fill_random_rows: scalar libm Box-Muller), and the per-row-gradient
// tile formation rate. The extension's CPU kernel adds an AVX2 Philox, the library's
// vectorised Box-Muller and an AVX2/FMA gradient tile; bench/bench_sketch_kernel.py
// times those in place. Built by CMake as bench_sketch_tile (not a test):
//
//     cmake -S . -B build/cmake && cmake --build build/cmake && build/cmake/bench_sketch_tile
//
// Prints medians of 7 runs after one warm-up, and one JSON line for scripts.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

#include "sven_ext/sketch_tile.h"

namespace {

using Clock = std::chrono::steady_clock;

// Median seconds of fn() over `repeats` runs after one warm-up.
double median_seconds(const std::function<void()>& fn, int repeats = 7) {
  fn();
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto start = Clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Keeps results alive so the optimiser cannot drop the work.
volatile double sink = 0.0;

}  // namespace

int main() {
  using namespace sven_ext;
  const int64_t rows = 4096, cols = 64;
  std::vector<double> out64(static_cast<size_t>(rows * cols));
  std::vector<float> out32(static_cast<size_t>(rows * cols));

  const int64_t calls = int64_t{1} << 22;
  const double t_raw = median_seconds([&] {
    uint32_t acc = 0;
    for (int64_t n = 0; n < calls; ++n) acc ^= philox_entry_words(7, 3, static_cast<uint64_t>(n), 0).w[0];
    sink = acc;
  });
  const double philox_calls = calls / t_raw;
  std::vector<uint32_t> words(static_cast<size_t>(4 * calls));
  const double t_lanes = median_seconds([&] {
    philox_pair_words(7, 3, 0, calls / 32, 32, words.data());
    sink = words[11];
  });
  const double lane_calls = calls / t_lanes;

  double rates[2][2];  // [distribution][float64, float32] entries per second
  const Distribution dists[2] = {Distribution::kGaussian, Distribution::kRademacher};
  for (int k = 0; k < 2; ++k) {
    const double t64 = median_seconds([&] {
      fill_random_rows(dists[k], 7, 3, 0, rows, cols, out64.data(), cols);
      sink = out64[17];
    });
    const double t32 = median_seconds([&] {
      fill_random_rows(dists[k], 7, 3, 0, rows, cols, out32.data(), cols);
      sink = out32[17];
    });
    rates[k][0] = rows * cols / t64;
    rates[k][1] = rows * cols / t32;
  }
  // One entry per pair of columns: the same Philox calls, plus the Box-Muller transcendental work.
  const double box_muller_ns = (1.0 / rates[0][0] - 1.0 / rates[1][0]) * 2e9;

  // Gradient tile: 128 rows x 2048 parameters of a (T, 784) x (T, 512) layer.
  const int64_t tile_rows = 128, d_in = 784, d_out = 512, count = 2048;
  double tile_rates[2];
  const int64_t step_counts[2] = {1, 16};
  for (int k = 0; k < 2; ++k) {
    const int64_t steps = step_counts[k];
    std::vector<float> a(static_cast<size_t>(tile_rows * steps * d_in), 0.5f);
    std::vector<float> d(static_cast<size_t>(tile_rows * steps * d_out), 0.25f);
    std::vector<float> g(static_cast<size_t>(tile_rows * count));
    const double t = median_seconds([&] {
      gradient_tile(a.data(), d.data(), tile_rows, steps, d_in, d_out, 1000, count, g.data(), count);
      sink = g[5];
    });
    tile_rates[k] = tile_rows * count / t;
  }

  std::printf("philox4x32-10 calls          %8.1f M/s  (%.2f ns each)\n", philox_calls / 1e6, 1e9 / philox_calls);
  std::printf("philox_pair_words (tile)     %8.1f M/s  (%.2f ns each)\n", lane_calls / 1e6, 1e9 / lane_calls);
  std::printf("gaussian entries,   float64  %8.1f M/s  (%.2f ns each)\n", rates[0][0] / 1e6, 1e9 / rates[0][0]);
  std::printf("gaussian entries,   float32  %8.1f M/s  (%.2f ns each)\n", rates[0][1] / 1e6, 1e9 / rates[0][1]);
  std::printf("rademacher entries, float64  %8.1f M/s  (%.2f ns each)\n", rates[1][0] / 1e6, 1e9 / rates[1][0]);
  std::printf("rademacher entries, float32  %8.1f M/s  (%.2f ns each)\n", rates[1][1] / 1e6, 1e9 / rates[1][1]);
  std::printf("box-muller per pair (log, sqrt, cos, sin)  %.2f ns\n", box_muller_ns);
  std::printf("gradient tile T=1  float32   %8.1f M entries/s\n", tile_rates[0] / 1e6);
  std::printf("gradient tile T=16 float32   %8.1f M entries/s (%.2f GFLOP/s)\n", tile_rates[1] / 1e6,
              2.0 * 16 * tile_rates[1] / 1e9);
  std::printf(
      "{\"philox_calls_per_s\": %.4g, \"philox_lane_calls_per_s\": %.4g, \"gaussian_f64_per_s\": %.4g, \"gaussian_f32_per_s\": %.4g, "
      "\"rademacher_f64_per_s\": %.4g, \"rademacher_f32_per_s\": %.4g, \"box_muller_ns_per_pair\": %.3g, "
      "\"gradient_tile_t1_per_s\": %.4g, \"gradient_tile_t16_per_s\": %.4g}\n",
      philox_calls, lane_calls, rates[0][0], rates[0][1], rates[1][0], rates[1][1], box_muller_ns, tile_rates[0], tile_rates[1]);
  return 0;
}
