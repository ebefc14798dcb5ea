// CPU impls of the subset ops.
//
// block_put_: one pass over each index vector with a seen-bitmap checks range and
// distinctness (O(R + C) time and bytes); then the (n, i) rows of the block are
// spread over threads, each copying block row (n, i) into out row (n, rows[i]) at
// columns cols[j]. Distinct indices make every write land on its own entry.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../torch/subset.h"

namespace sven_ext {
namespace {

// Entries copied below which a parallel region costs more than it saves.
constexpr int64_t kMinParallelEntries = int64_t{1} << 15;

IndexScan scan_indices(const int64_t* idx, int64_t n, int64_t size) {
  IndexScan s;
  std::vector<char> seen(static_cast<size_t>(size), 0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t v = idx[k];
    if (v < 0 || v >= size) {
      if (s.out_of_range++ == 0) {
        s.first_out_of_range = k;
        s.bad_value = v;
      }
    } else if (seen[v]) {
      s.smallest_repeated = s.repeats++ == 0 ? v : std::min(s.smallest_repeated, v);
    } else {
      seen[v] = 1;
    }
  }
  return s;
}

// Block rows p in [begin, end), p = n * r + i, into out[n, rows[i], cols[:]].
template <typename scalar_t>
void put_rows(scalar_t* out, const scalar_t* block, const int64_t* rows, const int64_t* cols, int64_t block_rows,
              int64_t block_cols, int64_t out_rows, int64_t out_cols, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / block_rows, i = p - n * block_rows;
    scalar_t* out_row = out + (n * out_rows + rows[i]) * out_cols;
    const scalar_t* block_row = block + p * block_cols;
    for (int64_t j = 0; j < block_cols; ++j) out_row[cols[j]] = block_row[j];
  }
}

void block_put_cpu(at::Tensor& out, const at::Tensor& rows_in, const at::Tensor& cols_in,
                   const at::Tensor& block_in) {
  constexpr const char* op = "block_put_";
  const BlockPutArgs args = check_block_put_args(out, rows_in, cols_in, block_in);
  const int64_t* rows = args.rows.const_data_ptr<int64_t>();
  const int64_t* cols = args.cols.const_data_ptr<int64_t>();
  check_index_scan(scan_indices(rows, args.block_rows, args.out_rows), op, "rows", "R = out.size(1)", args.out_rows);
  check_index_scan(scan_indices(cols, args.block_cols, args.out_cols), op, "cols", "C = out.size(2)", args.out_cols);
  if (args.entries() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "block_put_cpu", [&] {
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const scalar_t* block = args.block.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinParallelEntries / args.block_cols);
    at::parallel_for(0, args.batch * args.block_rows, grain, [&](int64_t begin, int64_t end) {
      put_rows(out_data, block, rows, cols, args.block_rows, args.block_cols, args.out_rows, args.out_cols, begin,
               end);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sven_ext, CPU, m) { m.impl("block_put_", &block_put_cpu); }

}  // namespace sven_ext
