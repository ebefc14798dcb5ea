// Host-side argument handling of the random ops, shared by the CPU and CUDA impls.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "checks.h"
#include "sven_ext/philox.h"

namespace sven_ext {

inline Distribution parse_distribution(const std::string& name, const char* op) {
  if (name == "gaussian") return Distribution::kGaussian;
  if (name == "rademacher") return Distribution::kRademacher;
  SVEN_CHECK(false, op, "distribution must be 'gaussian' or 'rademacher', got '", name, "'");
  return Distribution::kGaussian;  // unreachable
}

// Returns the counters contiguous (a copy when they are not): the kernels read rows of 4 words.
inline at::Tensor check_philox_raw_args(const at::Tensor& counters) {
  constexpr const char* op = "philox_raw";
  check_dim(counters, op, "counters", 2);
  SVEN_CHECK(counters.size(1) == 4, op, "counters must have shape (N, 4), got ", counters.sizes());
  check_dtype(counters, op, "counters", at::kLong);
  return counters.contiguous();
}

// The random fill is keyed by 32-bit stream and 64-bit seed; rows and columns are
// global indices into the virtual matrix (column pairs must fit 32 bits), formed in
// int64 as offset + local index, so the last one must not overflow.
inline void check_philox_fill_args(const at::Tensor& out, int64_t stream, int64_t row_offset, int64_t col_offset) {
  constexpr const char* op = "philox_fill_";
  check_dim(out, op, "out", 2);
  check_floating(out, op, "out");
  check_contiguous(out, op, "out");
  check_non_negative(row_offset, op, "row_offset");
  check_non_negative(col_offset, op, "col_offset");
  SVEN_CHECK(stream >= 0 && stream <= 0xffffffffLL, op, "stream must be in [0, 2^32), got ", stream);
  check_span(row_offset, out.size(0), INT64_MAX, op, "row_offset", "rows", "2^63 - 1");
  check_span(col_offset, out.size(1), int64_t{1} << 33, op, "col_offset", "cols", "2^33 (column pairs are 32-bit counters)");
}

}  // namespace sven_ext
