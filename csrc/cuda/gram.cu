// CUDA impls of the Gram ops: one fused kernel serves both.
//
// A block owns one pair of tiles (tile_i <= tile_j, see sven_ext/gram_tile.h),
// hence the K entries of its samples. For every pair of step chunks it forms
// the 64 x 64 tile of Sd = D_I D_J^T, and of Sa = A_I A_J^T (seq_gram) or the
// indicator [idx == idx'] (embedding_gram), through shared memory 16 features
// at a time, each thread holding a 4 x 4 sub-tile in registers (float32 for
// float32/float16/bfloat16 inputs, float64 for float64). The entrywise products
// are accumulated in float64 registers across chunk pairs. At the end the 64 x 64
// float64 accumulators go to shared memory, are summed per sample-pair block in
// two short passes, and K[i, j] = K[j, i] is written once: no atomics, so the
// result does not depend on scheduling. No T x T matrix is ever kept.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../torch/gram.h"
#include "sven_ext/gram_tile.h"

namespace sven_ext {
namespace {

constexpr int kTileRows = 64;                         // rows (and columns) of a block's product tile
constexpr int kSide = 16;                             // threads per side of the tile
constexpr int kThreads = kSide * kSide;               // 256
constexpr int kMicro = kTileRows / kSide;             // each thread: kMicro x kMicro products
constexpr int kChunk = 16;                            // features per shared-memory stage
constexpr int kRowsPerPass = kThreads / kChunk;       // tile rows one pass of the block loads
constexpr int kLoads = kTileRows / kRowsPerPass;      // loads per thread per stage
constexpr int kPad = 1;                               // breaks bank conflicts of the transposed stores
constexpr int64_t kMaxBlocks = int64_t{1} << 24;      // grid cap; a block loops over further tile pairs

static_assert(kMicro * kSide == kTileRows, "the threads must cover the tile");
static_assert(kLoads * kRowsPerPass == kTileRows && kThreads % kChunk == 0, "the loads must cover a stage");

// One stage: features [k0, k0 + kChunk) of the tile's rows and columns, transposed.
template <typename acc_t>
struct StageBuffers {
  acc_t rows[kChunk][kTileRows + kPad];
  acc_t cols[kChunk][kTileRows + kPad];
};

template <typename acc_t>
union GramShared {
  StageBuffers<acc_t> stage;
  double reduce[kTileRows][kTileRows + kPad];  // the float64 accumulators, once the products are done
};

// The flattened rows (sample * T + step, -1 for padding) this thread loads in each
// stage: tile rows threadIdx.x / kChunk + n * kRowsPerPass, feature threadIdx.x % kChunk.
struct LoadRows {
  int64_t row[kLoads];
};

__device__ __forceinline__ LoadRows load_rows(const GramTiling& g, int64_t first_sample, int64_t t0) {
  LoadRows rows;
#pragma unroll
  for (int n = 0; n < kLoads; ++n) rows.row[n] = g.row(first_sample, t0, threadIdx.x / kChunk + n * kRowsPerPass);
  return rows;
}

// dst[kk][r] = x[row(r), k0 + kk]; zero for padding rows and features past the end.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_stage(acc_t (*dst)[kTileRows + kPad], const scalar_t* __restrict__ x,
                                           int64_t features, int64_t k0, const LoadRows& rows) {
  const int kk = threadIdx.x % kChunk;
  const int64_t f = k0 + kk;
#pragma unroll
  for (int n = 0; n < kLoads; ++n) {
    const int r = threadIdx.x / kChunk + n * kRowsPerPass;
    const int64_t row = rows.row[n];
    dst[kk][r] = (row >= 0 && f < features) ? static_cast<acc_t>(x[row * features + f]) : acc_t(0);
  }
}

// s[m][n] = x[row_i(ty + m kSide)] . x[row_j(tx + n kSide)] over all features.
template <typename scalar_t, typename acc_t>
__device__ void tile_products(acc_t (&s)[kMicro][kMicro], StageBuffers<acc_t>& buf, const scalar_t* __restrict__ x,
                              int64_t features, const LoadRows& rows_i, const LoadRows& rows_j) {
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
#pragma unroll
  for (int m = 0; m < kMicro; ++m)
#pragma unroll
    for (int n = 0; n < kMicro; ++n) s[m][n] = acc_t(0);
  for (int64_t k0 = 0; k0 < features; k0 += kChunk) {
    load_stage(buf.rows, x, features, k0, rows_i);
    load_stage(buf.cols, x, features, k0, rows_j);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
      acc_t u[kMicro], v[kMicro];
#pragma unroll
      for (int m = 0; m < kMicro; ++m) {
        u[m] = buf.rows[kk][ty + m * kSide];
        v[m] = buf.cols[kk][tx + m * kSide];
      }
#pragma unroll
      for (int m = 0; m < kMicro; ++m)
#pragma unroll
        for (int n = 0; n < kMicro; ++n) s[m][n] += u[m] * v[n];
    }
    __syncthreads();  // the next stage overwrites the buffers
  }
}

// kEmbedding: K from indices and d (a unused); otherwise from a and d (indices unused).
template <typename scalar_t, typename acc_t, bool kEmbedding>
__global__ void __launch_bounds__(kThreads)
    gram_kernel(const scalar_t* __restrict__ a, const int64_t* __restrict__ indices, const scalar_t* __restrict__ d,
                double* __restrict__ k, GramTiling g, int64_t a_features, int64_t d_features) {
  __shared__ GramShared<acc_t> smem;
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  const int spt = static_cast<int>(g.samples_per_tile);  // S; S * chunk <= kTileRows
  const int chunk = static_cast<int>(g.step_chunk);
  const int64_t pairs = g.tile_pairs();
  for (int64_t p = blockIdx.x; p < pairs; p += gridDim.x) {
    const TrianglePair tiles = triangle_pair(p);
    const int64_t first_i = tiles.first * g.samples_per_tile, first_j = tiles.second * g.samples_per_tile;
    double acc[kMicro][kMicro];
#pragma unroll
    for (int m = 0; m < kMicro; ++m)
#pragma unroll
      for (int n = 0; n < kMicro; ++n) acc[m][n] = 0.0;

    for (int64_t t0 = 0; t0 < g.steps; t0 += g.step_chunk) {
      const LoadRows rows_i = load_rows(g, first_i, t0);
      int64_t out_i[kMicro];  // flattened rows of this thread's products, -1 for padding
#pragma unroll
      for (int m = 0; m < kMicro; ++m) out_i[m] = g.row(first_i, t0, ty + m * kSide);
      for (int64_t u0 = 0; u0 < g.steps; u0 += g.step_chunk) {
        const LoadRows rows_j = load_rows(g, first_j, u0);
        int64_t out_j[kMicro];
#pragma unroll
        for (int n = 0; n < kMicro; ++n) out_j[n] = g.row(first_j, u0, tx + n * kSide);
        acc_t sd[kMicro][kMicro];
        tile_products(sd, smem.stage, d, d_features, rows_i, rows_j);
        if constexpr (kEmbedding) {
          int64_t idx_i[kMicro], idx_j[kMicro];
#pragma unroll
          for (int m = 0; m < kMicro; ++m) {
            idx_i[m] = out_i[m] >= 0 ? indices[out_i[m]] : 0;
            idx_j[m] = out_j[m] >= 0 ? indices[out_j[m]] : 0;
          }
#pragma unroll
          for (int m = 0; m < kMicro; ++m)
#pragma unroll
            for (int n = 0; n < kMicro; ++n)
              if (out_i[m] >= 0 && out_j[n] >= 0 && idx_i[m] == idx_j[n]) acc[m][n] += static_cast<double>(sd[m][n]);
        } else {
          acc_t sa[kMicro][kMicro];
          tile_products(sa, smem.stage, a, a_features, rows_i, rows_j);
#pragma unroll
          for (int m = 0; m < kMicro; ++m)
#pragma unroll
            for (int n = 0; n < kMicro; ++n)
              if (out_i[m] >= 0 && out_j[n] >= 0)
                acc[m][n] += static_cast<double>(sa[m][n]) * static_cast<double>(sd[m][n]);
        }
      }
    }

    // Tile row si * chunk + t belongs to sample first_i + si, column sj * chunk + t' to first_j + sj.
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kMicro; ++m)
#pragma unroll
      for (int n = 0; n < kMicro; ++n) smem.reduce[ty + m * kSide][tx + n * kSide] = acc[m][n];
    __syncthreads();
    // Pass 1: each row's sum over each sample block of columns, stored at the block's first column.
    for (int q = threadIdx.x; q < spt * chunk * spt; q += kThreads) {
      const int r = q / spt, c0 = (q - r * spt) * chunk;
      double sum = 0.0;
      for (int c = c0; c < c0 + chunk; ++c) sum += smem.reduce[r][c];
      smem.reduce[r][c0] = sum;
    }
    __syncthreads();
    // Pass 2: each sample pair's sum over its rows; the upper triangle is written and mirrored.
    for (int q = threadIdx.x; q < spt * spt; q += kThreads) {
      const int si = q / spt, sj = q - si * spt;
      const int64_t i = first_i + si, j = first_j + sj;
      if (i < g.samples && j < g.samples && i <= j) {
        double sum = 0.0;
        for (int r = si * chunk; r < si * chunk + chunk; ++r) sum += smem.reduce[r][sj * chunk];
        k[i * g.samples + j] = sum;
        k[j * g.samples + i] = sum;
      }
    }
    __syncthreads();  // the next tile pair reuses the shared buffers
  }
}

unsigned int grid_for(const GramTiling& g) {
  return static_cast<unsigned int>(std::min<int64_t>(g.tile_pairs(), kMaxBlocks));
}

at::Tensor seq_gram_cuda(const at::Tensor& a_in, const at::Tensor& d_in) {
  const SeqGramArgs args = check_seq_gram_args(a_in, d_in);
  const c10::cuda::OptionalCUDAGuard guard(args.a.device());
  at::Tensor k = new_gram(args.a, args.batch);
  if (args.batch == 0 || args.steps == 0 || args.a_features == 0 || args.d_features == 0) return k;
  const GramTiling g = make_gram_tiling(args.batch, args.steps, kTileRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "seq_gram_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    gram_kernel<scalar_t, acc_t, false><<<grid_for(g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        args.a.const_data_ptr<scalar_t>(), nullptr, args.d.const_data_ptr<scalar_t>(), k.mutable_data_ptr<double>(),
        g, args.a_features, args.d_features);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return k;
}

at::Tensor embedding_gram_cuda(const at::Tensor& indices_in, const at::Tensor& d_in) {
  const EmbeddingGramArgs args = check_embedding_gram_args(indices_in, d_in);
  const c10::cuda::OptionalCUDAGuard guard(args.d.device());
  at::Tensor k = new_gram(args.d, args.batch);
  if (args.batch == 0 || args.steps == 0 || args.d_features == 0) return k;
  const GramTiling g = make_gram_tiling(args.batch, args.steps, kTileRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.d.scalar_type(), "embedding_gram_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    gram_kernel<scalar_t, acc_t, true><<<grid_for(g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        nullptr, args.indices.const_data_ptr<int64_t>(), args.d.const_data_ptr<scalar_t>(),
        k.mutable_data_ptr<double>(), g, 0, args.d_features);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return k;
}

}  // namespace

TORCH_LIBRARY_IMPL(sven_ext, CUDA, m) {
  m.impl("seq_gram", &seq_gram_cuda);
  m.impl("embedding_gram", &embedding_gram_cuda);
}

}  // namespace sven_ext
