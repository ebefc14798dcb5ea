// CPU impls of the Philox ops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../torch/random.h"
#include "sven_ext/sketch_tile.h"

namespace sven_ext {
namespace {

at::Tensor philox_raw_cpu(const at::Tensor& counters_in, int64_t seed) {
  const at::Tensor counters = check_philox_raw_args(counters_in);
  auto out = at::empty_like(counters);
  const int64_t* in = counters.const_data_ptr<int64_t>();
  int64_t* res = out.mutable_data_ptr<int64_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, counters.size(0), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const PhiloxWords ctr{{static_cast<uint32_t>(in[4 * n]), static_cast<uint32_t>(in[4 * n + 1]),
                             static_cast<uint32_t>(in[4 * n + 2]), static_cast<uint32_t>(in[4 * n + 3])}};
      const PhiloxWords x = philox4x32_10(ctr, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
      for (int i = 0; i < 4; ++i) res[4 * n + i] = x.w[i];
    }
  });
  return out;
}

// Entries come in pairs from one Philox call (columns 2m and 2m + 1, random_pair): each call
// fills both, so an odd col_offset starts with the odd half of its pair. Bitwise random_entry().
template <typename scalar_t>
void fill_rows(scalar_t* out, int64_t row_begin, int64_t row_end, int64_t cols, Distribution dist, uint64_t seed,
               uint32_t stream, int64_t row_offset, int64_t col_offset) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const uint64_t row = static_cast<uint64_t>(row_offset + i);
    scalar_t* out_row = out + i * cols;
    int64_t j = 0;
    if (col_offset & 1) {
      out_row[j++] = static_cast<scalar_t>(random_pair(dist, seed, stream, row, static_cast<uint64_t>(col_offset >> 1)).odd);
    }
    for (; j + 1 < cols; j += 2) {
      const EntryPair e = random_pair(dist, seed, stream, row, static_cast<uint64_t>((col_offset + j) >> 1));
      out_row[j] = static_cast<scalar_t>(e.even);
      out_row[j + 1] = static_cast<scalar_t>(e.odd);
    }
    if (j < cols) {
      out_row[j] = static_cast<scalar_t>(random_pair(dist, seed, stream, row, static_cast<uint64_t>((col_offset + j) >> 1)).even);
    }
  }
}

void philox_fill_cpu(at::Tensor& out, int64_t seed, int64_t stream, int64_t row_offset, int64_t col_offset,
                     c10::string_view distribution) {
  check_philox_fill_args(out, stream, row_offset, col_offset);
  const Distribution dist = parse_distribution(std::string(distribution), "philox_fill_");
  const int64_t rows = out.size(0), cols = out.size(1);
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "philox_fill_cpu", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      fill_rows(data, begin, end, cols, dist, static_cast<uint64_t>(seed), static_cast<uint32_t>(stream), row_offset,
                col_offset);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sven_ext, CPU, m) {
  m.impl("philox_raw", &philox_raw_cpu);
  m.impl("philox_fill_", &philox_fill_cpu);
}

}  // namespace sven_ext
