// CUDA impls of the subset ops.
//
// block_put_: one small kernel per index vector marks each value in a zeroed int32
// "seen" buffer (atomicExch) and counts, with atomics, the entries out of range and
// those whose value was already marked; one copy of those counters to the host
// (the op's only sync) raises the error there. Then a grid-stride kernel walks the
// block's N * r * c entries in memory order (coalesced reads, stores scattered
// along the index vectors) and writes each to out[n, rows[i], cols[j]].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "../torch/subset.h"

namespace sven_ext {
namespace {

constexpr int kThreads = 256;
// Resident blocks per SM the copy grid is sized for; each thread then walks several
// entries, so its divisions are amortised (see block_put_kernel).
constexpr int kBlocksPerSM = 8;

// Counter slots per index vector. Positions and values are kept as (size - x) under
// atomicMax, so that the zeroed buffer means "none" and the maximum is the smallest x.
enum ScanSlot { kOutOfRange, kFirstOutOfRange, kRepeats, kSmallestRepeated, kSlots };

int64_t blocks_for(int64_t work) {
  // A grid-stride loop covers any remainder; cap the grid so huge inputs launch.
  return std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t{1} << 20);
}

__global__ void scan_indices_kernel(const int64_t* __restrict__ idx, int64_t n, int64_t size, int* __restrict__ seen,
                                    unsigned long long* __restrict__ counters) {
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < n; k += int64_t{blockDim.x} * gridDim.x) {
    const int64_t v = idx[k];
    if (v < 0 || v >= size) {
      atomicAdd(&counters[kOutOfRange], 1ULL);
      atomicMax(&counters[kFirstOutOfRange], static_cast<unsigned long long>(n - k));
    } else if (atomicExch(&seen[v], 1) != 0) {
      atomicAdd(&counters[kRepeats], 1ULL);
      atomicMax(&counters[kSmallestRepeated], static_cast<unsigned long long>(size - v));
    }
  }
}

// Entry e = p * c + j of the flat block, p = n * r + i, goes to out[n, rows[i], cols[j]].
// (n, i, j) are divided out of the thread's first entry only and then advanced by
// the stride's quotients and remainders: no 64-bit division per entry.
template <typename scalar_t>
__global__ void block_put_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ block,
                                 const int64_t* __restrict__ rows, const int64_t* __restrict__ cols, int64_t entries,
                                 int64_t block_rows, int64_t block_cols, int64_t out_rows, int64_t out_cols) {
  const int64_t stride = int64_t{blockDim.x} * gridDim.x;
  int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (e >= entries) return;
  int64_t p = e / block_cols, j = e - p * block_cols;
  int64_t n = p / block_rows, i = p - n * block_rows;
  const int64_t step_p = stride / block_cols, step_j = stride - step_p * block_cols;
  const int64_t step_n = step_p / block_rows, step_i = step_p - step_n * block_rows;
  for (; e < entries; e += stride) {
    out[(n * out_rows + rows[i]) * out_cols + cols[j]] = block[e];
    j += step_j;
    i += step_i;
    n += step_n;
    if (j >= block_cols) {  // j < 2c: one carry at most
      j -= block_cols;
      ++i;
    }
    if (i >= block_rows) {  // i < 2r: likewise
      i -= block_rows;
      ++n;
    }
  }
}

IndexScan to_scan(const int64_t* c, const at::Tensor& idx, int64_t size) {
  IndexScan s;
  s.out_of_range = c[kOutOfRange];
  s.repeats = c[kRepeats];
  if (s.out_of_range) {
    s.first_out_of_range = idx.numel() - c[kFirstOutOfRange];
    s.bad_value = idx[s.first_out_of_range].item<int64_t>();  // a second copy, on the error path only
  }
  if (s.repeats) s.smallest_repeated = size - c[kSmallestRepeated];
  return s;
}

void block_put_cuda(at::Tensor& out, const at::Tensor& rows_in, const at::Tensor& cols_in,
                    const at::Tensor& block_in) {
  constexpr const char* op = "block_put_";
  const BlockPutArgs args = check_block_put_args(out, rows_in, cols_in, block_in);
  const c10::cuda::OptionalCUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t r = args.block_rows, c = args.block_cols;
  if (r > 0 || c > 0) {
    at::Tensor seen = at::zeros({args.out_rows + args.out_cols}, out.options().dtype(at::kInt));
    at::Tensor counters = at::zeros({2, kSlots}, out.options().dtype(at::kLong));
    auto* counts = reinterpret_cast<unsigned long long*>(counters.mutable_data_ptr<int64_t>());
    if (r > 0) {
      scan_indices_kernel<<<blocks_for(r), kThreads, 0, stream>>>(args.rows.const_data_ptr<int64_t>(), r,
                                                                  args.out_rows, seen.mutable_data_ptr<int>(), counts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (c > 0) {
      scan_indices_kernel<<<blocks_for(c), kThreads, 0, stream>>>(
          args.cols.const_data_ptr<int64_t>(), c, args.out_cols, seen.mutable_data_ptr<int>() + args.out_rows,
          counts + kSlots);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const at::Tensor host = counters.cpu();
    const int64_t* h = host.const_data_ptr<int64_t>();
    check_index_scan(to_scan(h, args.rows, args.out_rows), op, "rows", "R = out.size(1)", args.out_rows);
    check_index_scan(to_scan(h + kSlots, args.cols, args.out_cols), op, "cols", "C = out.size(2)", args.out_cols);
  }
  const int64_t entries = args.entries();
  if (entries == 0) return;
  // Straight from the runtime: ATen's device-properties header needs the CUDA math libraries' headers.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t resident = int64_t{sms} * kBlocksPerSM;
  const auto grid = static_cast<unsigned int>(std::min(blocks_for(entries), resident));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "block_put_cuda", [&] {
    block_put_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), args.block.const_data_ptr<scalar_t>(), args.rows.const_data_ptr<int64_t>(),
        args.cols.const_data_ptr<int64_t>(), entries, r, c, args.out_rows, args.out_cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sven_ext, CUDA, m) { m.impl("block_put_", &block_put_cuda); }

}  // namespace sven_ext
