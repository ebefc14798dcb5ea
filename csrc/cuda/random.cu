// CUDA impls of the Philox ops: the same header as the CPU impls, so the same bits.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../torch/random.h"

namespace sven_ext {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t work) {
  // A grid-stride loop covers any remainder; cap the grid so huge inputs launch.
  return std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t{1} << 20);
}

__global__ void philox_raw_kernel(const int64_t* __restrict__ in, int64_t* __restrict__ out, int64_t n,
                                  uint64_t key) {
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < n;
       idx += int64_t{blockDim.x} * gridDim.x) {
    const PhiloxWords ctr{{static_cast<uint32_t>(in[4 * idx]), static_cast<uint32_t>(in[4 * idx + 1]),
                           static_cast<uint32_t>(in[4 * idx + 2]), static_cast<uint32_t>(in[4 * idx + 3])}};
    const PhiloxWords x = philox4x32_10(ctr, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
#pragma unroll
    for (int i = 0; i < 4; ++i) out[4 * idx + i] = x.w[i];
  }
}

// One thread per entry; each entry is a pure function of its global (row, col).
template <typename scalar_t>
__global__ void philox_fill_kernel(scalar_t* __restrict__ out, int64_t rows, int64_t cols, Distribution dist,
                                   uint64_t seed, uint32_t stream, int64_t row_offset, int64_t col_offset) {
  const int64_t n = rows * cols;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < n;
       idx += int64_t{blockDim.x} * gridDim.x) {
    const int64_t i = idx / cols, j = idx - i * cols;
    out[idx] = static_cast<scalar_t>(random_entry(dist, seed, stream, static_cast<uint64_t>(row_offset + i),
                                                  static_cast<uint64_t>(col_offset + j)));
  }
}

at::Tensor philox_raw_cuda(const at::Tensor& counters_in, int64_t seed) {
  const at::Tensor counters = check_philox_raw_args(counters_in);
  const c10::cuda::OptionalCUDAGuard guard(counters.device());
  auto out = at::empty_like(counters);
  const int64_t n = counters.size(0);
  if (n == 0) return out;
  philox_raw_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      counters.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), n, static_cast<uint64_t>(seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void philox_fill_cuda(at::Tensor& out, int64_t seed, int64_t stream, int64_t row_offset, int64_t col_offset,
                      c10::string_view distribution) {
  check_philox_fill_args(out, stream, row_offset, col_offset);
  const Distribution dist = parse_distribution(std::string(distribution), "philox_fill_");
  if (out.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "philox_fill_cuda", [&] {
    philox_fill_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), out.size(0), out.size(1), dist, static_cast<uint64_t>(seed),
        static_cast<uint32_t>(stream), row_offset, col_offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sven_ext, CUDA, m) {
  m.impl("philox_raw", &philox_raw_cuda);
  m.impl("philox_fill_", &philox_fill_cuda);
}

}  // namespace sven_ext
