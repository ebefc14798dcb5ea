// CPU impls of the Linear-layer sketch ops (see sven_ext/sketch_tile.h).
//
// The flat parameter range is cut into tiles whose W rows (Omega generated, or
// a view of the stored Z) fill about kWTileBytes, and the rows of Y into blocks
// whose per-row-gradient tile G (rows x tile) fills about kGTileBytes: both stay
// in a core's L2. Work items are (group of consecutive tiles) x (part of the
// rows); each runs on one thread, start to end: per tile it generates the W tile
// once into a per-thread buffer, then for each block of its rows forms G from a
// and d, multiplies it with W by one single-threaded library GEMM, and adds the
// product in float64 to its group's partial Y. Threads take items from a shared
// counter (one parallel region in all: no barrier per tile, which matters on a
// busy machine), and the partials are summed in group order at the end. The
// cut depends only on the sizes, never on the thread count, so neither does the
// result. Neither the per-row gradients nor Omega ever exist whole.
//
// Random tiles: the Philox words of all the tile's column pairs first (AVX2,
// eight counters at a time, where the CPU has it: the same bits as philox.h),
// then Rademacher signs from the low bits, or Gaussian pairs by Box-Muller with
// the library's vectorised float64 log, sqrt, cos and sin over the whole tile
// (within an ulp or so of philox.h's scalar libm values). At realistic sizes the
// Gaussian transform costs about 3x the Rademacher path and, for few rows
// (R of a few hundred), as much as the GEMM itself: see bench/bench_sketch_kernel.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SVEN_EXT_X86_AVX2 1
#endif

#include "../torch/sketch.h"
#include "sven_ext/sketch_tile.h"

namespace sven_ext {
namespace {

// Sizes that keep a tile of W and a block's G tile in a core's L2 together.
constexpr int64_t kWTileBytes = int64_t{192} << 10;
constexpr int64_t kGTileBytes = int64_t{192} << 10;
constexpr int64_t kMinTile = 64;  // parameters: below this the GEMM's inner dimension is too short to pay
constexpr int64_t kMaxTile = 2048;
constexpr int64_t kMinRowBlock = 16;
constexpr int64_t kMaxRowBlock = 256;
// Work items to aim for (a fixed number: the cut must not depend on the thread count),
// the partial Ys' memory, and the fewest rows worth a part of their own (each part
// regenerates its groups' random tiles).
constexpr int64_t kTargetItems = 32;
constexpr int64_t kMaxPartialBytes = int64_t{64} << 20;
constexpr int64_t kMinPartRows = 256;

struct CpuPlan {
  SketchTiling tiling;
  int64_t row_block;
  int64_t row_blocks;
  int64_t groups;     // consecutive runs of tiles, each with its own partial Y
  int64_t row_parts;  // consecutive runs of row blocks

  int64_t items() const { return groups * row_parts; }
  // [first, last) of group g's tiles, or of part rp's row blocks: balanced runs.
  int64_t tile_begin(int64_t g) const { return g * tiling.tiles() / groups; }
  int64_t block_begin(int64_t rp) const { return rp * row_blocks / row_parts; }
};

CpuPlan plan(const LinearFactors& f, int64_t cols, int64_t element_size) {
  CpuPlan p{};
  const int64_t tile = std::clamp<int64_t>(kWTileBytes / (std::max<int64_t>(cols, 1) * element_size), kMinTile,
                                           kMaxTile);
  p.tiling = make_sketch_tiling(f.d_in, f.d_out, std::min(tile, f.params()));
  const int64_t widest = std::max(p.tiling.tile, cols);  // the G tile's and the product's row lengths
  p.row_block = std::clamp<int64_t>(kGTileBytes / (widest * element_size), kMinRowBlock, kMaxRowBlock);
  p.row_blocks = (f.rows + p.row_block - 1) / p.row_block;
  const int64_t partial_bytes = f.rows * std::max<int64_t>(cols, 1) * int64_t{sizeof(double)};
  const int64_t max_groups = std::max<int64_t>(1, kMaxPartialBytes / partial_bytes);
  p.groups = std::max<int64_t>(1, std::min({p.tiling.tiles(), kTargetItems, max_groups}));
  const int64_t max_parts = std::max<int64_t>(1, std::min(p.row_blocks, f.rows / kMinPartRows));
  p.row_parts = std::clamp<int64_t>(kTargetItems / p.groups, 1, max_parts);
  return p;
}

// Per-thread buffers: the W tile (when generated), a block's G tile and its product with W.
struct Workspace {
  at::Tensor w;        // tile * cols
  at::Tensor g;        // row_block * tile
  at::Tensor product;  // row_block * cols
  // Generation of a random tile: Philox words, then the Box-Muller inputs and cosines.
  std::vector<uint32_t> words;
  at::Tensor radius, angle, cosine;  // float64, tile * pairs each (Gaussian only)
};

#ifdef SVEN_EXT_X86_AVX2
// philox_pair_words (sven_ext/sketch_tile.h) on 8 counters at a time in AVX2, the
// same rounds as philox4x32_10: 32-bit words in 64-bit lanes, so _mm256_mul_epu32
// gives the full 64-bit products (high word: the mulhi, low word: the mullo).
__attribute__((target("avx2"))) void philox_pair_words_avx2(uint64_t seed, uint32_t stream, uint64_t first_row,
                                                            int64_t rows, int64_t pairs, uint32_t* words) {
  constexpr int kLanes = 8;
  const int64_t n = rows * pairs;
  const __m256i mask = _mm256_set1_epi64x(0xffffffffLL);
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  __m256i keys[kPhiloxRounds][2];
  for (int round = 0; round < kPhiloxRounds; ++round) {
    keys[round][0] = _mm256_set1_epi64x(static_cast<uint32_t>(static_cast<uint32_t>(seed) + round * kPhiloxW0));
    keys[round][1] = _mm256_set1_epi64x(static_cast<uint32_t>(static_cast<uint32_t>(seed >> 32) + round * kPhiloxW1));
  }
  int64_t k = 0, m = 0;  // (row, pair) of the chunk's first lane
  for (int64_t base = 0; base < n; base += kLanes) {
    alignas(32) uint64_t c[4][kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t row = first_row + static_cast<uint64_t>(k);
      c[0][l] = static_cast<uint64_t>(m);
      c[1][l] = row & 0xffffffffULL;
      c[2][l] = row >> 32 & 0xffffffffULL;
      c[3][l] = stream;
      if (++m == pairs) {
        m = 0;
        ++k;
      }
    }
    __m256i x[4][2];
    for (int w = 0; w < 4; ++w)
      for (int h = 0; h < 2; ++h) x[w][h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(&c[w][4 * h]));
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int h = 0; h < 2; ++h) {
        const __m256i p0 = _mm256_mul_epu32(x[0][h], m0);
        const __m256i p1 = _mm256_mul_epu32(x[2][h], m1);
        const __m256i next0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), x[1][h]), keys[round][0]);
        const __m256i next2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), x[3][h]), keys[round][1]);
        x[1][h] = _mm256_and_si256(p1, mask);
        x[3][h] = _mm256_and_si256(p0, mask);
        x[0][h] = next0;
        x[2][h] = next2;
      }
    }
    for (int w = 0; w < 4; ++w)
      for (int h = 0; h < 2; ++h) _mm256_store_si256(reinterpret_cast<__m256i*>(&c[w][4 * h]), x[w][h]);
    const int64_t valid = std::min<int64_t>(kLanes, n - base);
    for (int w = 0; w < 4; ++w)
      for (int64_t l = 0; l < valid; ++l) words[w * n + base + l] = static_cast<uint32_t>(c[w][l]);
  }
}

bool have_avx2() {
  // __builtin_cpu_init first: this may run before libgcc's own initialiser has.
  static const bool have = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
  }();
  return have;
}

// gradient_tile (sven_ext/sketch_tile.h) compiled for AVX2 and FMA: its fixed-length
// lane loop becomes 8-wide fused multiply-adds (the extension itself targets baseline x86-64).
template <typename scalar_t>
__attribute__((target("avx2,fma"), flatten)) void gradient_tile_avx2(const scalar_t* a, const scalar_t* d,
                                                                       int64_t rows, int64_t steps, int64_t d_in,
                                                                       int64_t d_out, int64_t p0, int64_t count,
                                                                       scalar_t* g, int64_t ldg) {
  gradient_tile(a, d, rows, steps, d_in, d_out, p0, count, g, ldg);
}
#endif

// G tile of a block of rows: the AVX2 build of gradient_tile where the CPU has it.
template <typename scalar_t>
void form_gradient_tile(const scalar_t* a, const scalar_t* d, int64_t rows, int64_t steps, int64_t d_in,
                        int64_t d_out, int64_t p0, int64_t count, scalar_t* g, int64_t ldg) {
#ifdef SVEN_EXT_X86_AVX2
  if (have_avx2()) return gradient_tile_avx2(a, d, rows, steps, d_in, d_out, p0, count, g, ldg);
#endif
  gradient_tile(a, d, rows, steps, d_in, d_out, p0, count, g, ldg);
}

// The Philox words of a tile's column pairs: AVX2 where the CPU has it (the same bits).
void tile_words(uint64_t seed, uint32_t stream, uint64_t first_row, int64_t rows, int64_t pairs, uint32_t* words) {
#ifdef SVEN_EXT_X86_AVX2
  if (have_avx2()) return philox_pair_words_avx2(seed, stream, first_row, rows, pairs, words);
#endif
  philox_pair_words(seed, stream, first_row, rows, pairs, words);
}

// Pairs per tile below which the scalar Box-Muller is cheaper than a few library calls.
constexpr int64_t kMinVectorPairs = 4096;

// out[k * cols + j] = Omega[first_row + k, j] for k < rows, j < cols: the Philox words of
// the whole tile first (vectorised), then, for Gaussian entries, Box-Muller with the
// library's vectorised log, sqrt, cos and sin on the tile's float64 uniforms (within an
// ulp or so of the scalar libm values of philox.h; Rademacher entries are bitwise the same).
template <typename scalar_t>
void fill_random_tile(Distribution dist, uint64_t seed, uint32_t stream, uint64_t first_row, int64_t rows,
                      int64_t cols, scalar_t* out, Workspace& ws) {
  const int64_t pairs = (cols + 1) / 2, n = rows * pairs;
  if (dist == Distribution::kGaussian && n < kMinVectorPairs) {
    fill_random_rows(dist, seed, stream, first_row, rows, cols, out, cols);
    return;
  }
  ws.words.resize(static_cast<size_t>(4 * n));
  tile_words(seed, stream, first_row, rows, pairs, ws.words.data());
  const uint32_t* w0 = ws.words.data();
  const uint32_t* w1 = w0 + n;
  if (dist == Distribution::kRademacher) {
    // +1 / -1 from the low bit, branch-free: 2 * bit - 1.
    const auto sign = [](uint32_t bits) { return static_cast<scalar_t>(static_cast<int>(bits & 1u) * 2 - 1); };
    for (int64_t k = 0; k < rows; ++k) {
      scalar_t* out_row = out + k * cols;
      const int64_t idx = k * pairs;
      for (int64_t m = 0; m < cols / 2; ++m) {
        out_row[2 * m] = sign(w0[idx + m]);
        out_row[2 * m + 1] = sign(w1[idx + m]);
      }
      if (cols & 1) out_row[cols - 1] = sign(w0[idx + pairs - 1]);
    }
    return;
  }
  const uint32_t* w2 = w1 + n;
  const uint32_t* w3 = w2 + n;
  if (!ws.radius.defined() || ws.radius.numel() < n) {
    const auto options = at::TensorOptions().dtype(at::kDouble);
    ws.radius = at::empty({n}, options);
    ws.angle = at::empty({n}, options);
    ws.cosine = at::empty({n}, options);
  }
  at::Tensor radius = ws.radius.narrow(0, 0, n), angle = ws.angle.narrow(0, 0, n), cosine = ws.cosine.narrow(0, 0, n);
  double* u_radius = radius.mutable_data_ptr<double>();
  double* u_angle = angle.mutable_data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    u_radius[i] = uniform_open01(w0[i], w1[i]);
    u_angle[i] = uniform_open01(w2[i], w3[i]);
  }
  // The same operations, in the same order, as gaussian_pair.
  radius.log_().mul_(-2.0).sqrt_();
  angle.mul_(6.283185307179586476925286766559);
  at::cos_out(cosine, angle);
  angle.sin_();
  const double* r = radius.const_data_ptr<double>();
  const double* c = cosine.const_data_ptr<double>();
  const double* si = angle.const_data_ptr<double>();
  for (int64_t k = 0; k < rows; ++k) {
    scalar_t* out_row = out + k * cols;
    const int64_t idx = k * pairs;
    for (int64_t m = 0; m < cols / 2; ++m) {
      out_row[2 * m] = static_cast<scalar_t>(r[idx + m] * c[idx + m]);
      out_row[2 * m + 1] = static_cast<scalar_t>(r[idx + m] * si[idx + m]);
    }
    if (cols & 1) out_row[cols - 1] = static_cast<scalar_t>(r[idx + pairs - 1] * c[idx + pairs - 1]);
  }
}

// Y = sum over tiles of G_tile @ W_tile. w_tile(q, ws) returns tile q's rows of W, a
// (tiling.size(q), cols) tensor of scalar_t (filling ws.w if it generates them).
template <typename scalar_t, typename WTile>
void project_tiles(const LinearFactors& f, const CpuPlan& p, int64_t cols, WTile&& w_tile, at::Tensor& y) {
  const int64_t rows = f.rows, steps = f.steps;
  const scalar_t* a = f.a.const_data_ptr<scalar_t>();
  const scalar_t* d = f.d.const_data_ptr<scalar_t>();
  const at::Tensor partial = p.groups == 1 ? y : at::zeros({p.groups, rows, cols}, y.options());
  double* partial_data = partial.mutable_data_ptr<double>();
  const auto options = f.a.options();

  const auto run_item = [&](int64_t item, Workspace& ws) {
    const int64_t group = item % p.groups, part = item / p.groups;
    double* out = partial_data + group * rows * cols;
    for (int64_t q = p.tile_begin(group); q < p.tile_begin(group + 1); ++q) {
      const int64_t p0 = p.tiling.begin(q), count = p.tiling.size(q);
      const at::Tensor w = w_tile(q, ws);
      for (int64_t b = p.block_begin(part); b < p.block_begin(part + 1); ++b) {
        const int64_t r0 = b * p.row_block, n = std::min(p.row_block, rows - r0);
        at::Tensor g = ws.g.narrow(0, 0, n * count).view({n, count});
        at::Tensor product = ws.product.narrow(0, 0, n * cols).view({n, cols});
        form_gradient_tile(a + r0 * steps * f.d_in, d + r0 * steps * f.d_out, n, steps, f.d_in, f.d_out, p0, count,
                           g.mutable_data_ptr<scalar_t>(), count);
        at::mm_out(product, g, w);
        const scalar_t* src = product.const_data_ptr<scalar_t>();
        double* dst = out + r0 * cols;
        for (int64_t k = 0; k < n * cols; ++k) dst[k] += static_cast<double>(src[k]);
      }
    }
  };

  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(p.items(), at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    Workspace ws{at::empty({p.tiling.tile * cols}, options), at::empty({p.row_block * p.tiling.tile}, options),
                 at::empty({p.row_block * cols}, options), {}, {}, {}, {}};
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t item = next++; item < p.items(); item = next++) run_item(item, ws);
  });

  if (p.groups > 1) {
    // Y = sum of the partials in group order, rows in parallel.
    double* y_data = y.mutable_data_ptr<double>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / (cols * p.groups)), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin * cols; k < end * cols; ++k) {
        double sum = 0.0;
        for (int64_t g = 0; g < p.groups; ++g) sum += partial_data[g * rows * cols + k];
        y_data[k] = sum;
      }
    });
  }
}

at::Tensor linear_sketch_cpu(const at::Tensor& a_in, const at::Tensor& d_in, int64_t seed, int64_t stream,
                             int64_t row_offset, int64_t cols, c10::string_view distribution) {
  const LinearSketchArgs args =
      check_linear_sketch_args(a_in, d_in, seed, stream, row_offset, cols, std::string(distribution));
  const LinearFactors& f = args.f;
  at::Tensor y = new_sketch(f.a, f.rows, cols);
  if (f.empty()) return y;
  AT_DISPATCH_FLOATING_TYPES(f.a.scalar_type(), "linear_sketch_cpu", [&] {
    const CpuPlan p = plan(f, cols, sizeof(scalar_t));
    const auto w_tile = [&](int64_t q, Workspace& ws) {
      const int64_t count = p.tiling.size(q);
      fill_random_tile(args.dist, args.seed, args.stream, args.row_offset + static_cast<uint64_t>(p.tiling.begin(q)),
                       count, cols, ws.w.mutable_data_ptr<scalar_t>(), ws);
      return ws.w.narrow(0, 0, count * cols).view({count, cols});
    };
    project_tiles<scalar_t>(f, p, cols, w_tile, y);
  });
  return y;
}

at::Tensor linear_project_cpu(const at::Tensor& a_in, const at::Tensor& d_in, const at::Tensor& z_in) {
  const LinearProjectArgs args = check_linear_project_args(a_in, d_in, z_in);
  const LinearFactors& f = args.f;
  at::Tensor y = new_sketch(f.a, f.rows, args.cols);
  if (f.empty() || args.cols == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(f.a.scalar_type(), "linear_project_cpu", [&] {
    const CpuPlan p = plan(f, args.cols, sizeof(scalar_t));
    const auto w_tile = [&](int64_t q, Workspace&) { return args.z.narrow(0, p.tiling.begin(q), p.tiling.size(q)); };
    project_tiles<scalar_t>(f, p, args.cols, w_tile, y);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sven_ext, CPU, m) {
  m.impl("linear_sketch", &linear_sketch_cpu);
  m.impl("linear_project", &linear_project_cpu);
}

}  // namespace sven_ext
