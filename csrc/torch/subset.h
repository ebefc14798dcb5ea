// Host-side argument handling of the subset ops, shared by the CPU and CUDA impls.
//
// block_put_ writes block[n, i, j] to out[n, rows[i], cols[j]]. Shapes, dtypes and
// devices are checked here; the index values (in range, and distinct: a repeated
// index would have two parallel writes race for one entry) are scanned by each
// device impl where the indices live, and judged here so that both raise the same
// message. Non-contiguous rows, cols and block are copied to contiguous ones; out
// is written in place, so it must be contiguous already.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "checks.h"

namespace sven_ext {

struct BlockPutArgs {
  at::Tensor rows;   // (r,) int64, contiguous
  at::Tensor cols;   // (c,) int64, contiguous
  at::Tensor block;  // (N, r, c), contiguous, out's dtype, no memory shared with out
  int64_t batch, out_rows, out_cols, block_rows, block_cols;  // N, R, C, r, c

  int64_t entries() const { return batch * block_rows * block_cols; }
};

inline BlockPutArgs check_block_put_args(const at::Tensor& out, const at::Tensor& rows, const at::Tensor& cols,
                                         const at::Tensor& block) {
  constexpr const char* op = "block_put_";
  check_dim(out, op, "out", 3);
  check_dim(rows, op, "rows", 1);
  check_dim(cols, op, "cols", 1);
  check_dim(block, op, "block", 3);
  check_same_device(out, rows, op, "out", "rows");
  check_same_device(out, cols, op, "out", "cols");
  check_same_device(out, block, op, "out", "block");
  check_floating(out, op, "out");
  check_dtype(rows, op, "rows", at::kLong);
  check_dtype(cols, op, "cols", at::kLong);
  SVEN_CHECK(block.scalar_type() == out.scalar_type(), op, "out and block must have one dtype, got ",
             out.scalar_type(), " and ", block.scalar_type());
  check_contiguous(out, op, "out");
  SVEN_CHECK(block.size(0) == out.size(0), op, "block and out must have the same batch size N (dim 0), got block ",
             block.sizes(), " and out ", out.sizes());
  SVEN_CHECK(block.size(1) == rows.size(0), op, "block must have rows.numel() rows (dim 1), got block ",
             block.sizes(), " and rows ", rows.sizes());
  SVEN_CHECK(block.size(2) == cols.size(0), op, "block must have cols.numel() columns (dim 2), got block ",
             block.sizes(), " and cols ", cols.sizes());
  at::Tensor block_c = block.contiguous();
  // A block that is (a view of) part of out would change while it is read.
  if (at::get_overlap_status(out, block_c) != at::MemOverlapStatus::No) block_c = block_c.clone();
  return BlockPutArgs{rows.contiguous(), cols.contiguous(), std::move(block_c), out.size(0), out.size(1),
                      out.size(2), block.size(1), block.size(2)};
}

// What one pass over an index vector found, against [0, size).
struct IndexScan {
  int64_t out_of_range = 0;        // entries outside [0, size)
  int64_t first_out_of_range = 0;  // position of the first of them
  int64_t bad_value = 0;           // its value
  int64_t repeats = 0;             // in-range entries beyond the first holding their value
  int64_t smallest_repeated = 0;   // the smallest value held more than once
};

// `size_text` names the bound, e.g. "R = out.size(1)".
inline void check_index_scan(const IndexScan& s, const char* op, const char* name, const char* size_text,
                             int64_t size) {
  SVEN_CHECK(s.out_of_range == 0, op, name, " must hold indices in [0, ", size_text, ") = [0, ", size, "), got ",
             name, "[", s.first_out_of_range, "] = ", s.bad_value, " (entries out of range: ", s.out_of_range, ")");
  SVEN_CHECK(s.repeats == 0, op, name, " must hold distinct indices (a repeated one makes two writes race), got ",
             s.smallest_repeated, " more than once (repeated entries: ", s.repeats, ")");
}

}  // namespace sven_ext
