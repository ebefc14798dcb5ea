// Host-side argument handling of the Linear-layer sketch ops, shared by the CPU and CUDA impls.
//
// Both ops compute in a "compute dtype": float64 when any input is float64,
// float32 otherwise (float16/bfloat16 factors are exact in float32). Inputs of
// another dtype, and non-contiguous ones, are converted/copied here: a and d are
// the small per-row factors; z, when it must be converted, is copied once.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "checks.h"
#include "random.h"

namespace sven_ext {

struct LinearFactors {
  at::Tensor a;  // (R, T, d_in), contiguous, compute dtype
  at::Tensor d;  // (R, T, d_out), contiguous, compute dtype
  int64_t rows, steps, d_in, d_out;

  int64_t params() const { return d_in * d_out; }
  // No step or no parameter: every per-row gradient is zero.
  bool empty() const { return rows == 0 || steps == 0 || d_in == 0 || d_out == 0; }
};

struct LinearSketchArgs {
  LinearFactors f;
  Distribution dist;
  uint64_t seed;
  uint32_t stream;
  uint64_t row_offset;
  int64_t cols;
};

struct LinearProjectArgs {
  LinearFactors f;
  at::Tensor z;  // (P, s) view of z, contiguous, compute dtype
  int64_t cols;  // s
};

inline at::ScalarType compute_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

inline LinearFactors check_linear_factors(const at::Tensor& a, const at::Tensor& d, const char* op,
                                          at::ScalarType compute) {
  check_factor_pair(a, d, op);
  SVEN_CHECK(a.size(0) == d.size(0), op, "a and d must have the same number of rows R (dim 0), got a ", a.sizes(),
             " and d ", d.sizes());
  SVEN_CHECK(a.size(1) == d.size(1), op, "a and d must have the same sequence length T (dim 1), got a ", a.sizes(),
             " and d ", d.sizes());
  return LinearFactors{a.to(compute).contiguous(), d.to(compute).contiguous(), a.size(0), a.size(1), a.size(2),
                       d.size(2)};
}

inline LinearSketchArgs check_linear_sketch_args(const at::Tensor& a, const at::Tensor& d, int64_t seed,
                                                 int64_t stream, int64_t row_offset, int64_t cols,
                                                 const std::string& distribution) {
  constexpr const char* op = "linear_sketch";
  LinearFactors f = check_linear_factors(a, d, op, compute_dtype(a.scalar_type()));
  const Distribution dist = parse_distribution(distribution, op);
  SVEN_CHECK(cols >= 1, op, "cols must be >= 1, got ", cols);
  SVEN_CHECK(cols <= (int64_t{1} << 33), op, "cols must be <= 2^33 (column pairs are 32-bit counters), got ", cols);
  SVEN_CHECK(stream >= 0 && stream <= 0xffffffffLL, op, "stream must be in [0, 2^32), got ", stream);
  check_non_negative(row_offset, op, "row_offset");
  SVEN_CHECK(f.d_in == 0 || f.d_out <= (INT64_MAX - row_offset) / f.d_in, op,
             "row_offset + d_out * d_in must fit in int64, got row_offset ", row_offset, ", d_out ", f.d_out,
             ", d_in ", f.d_in);
  return LinearSketchArgs{std::move(f), dist, static_cast<uint64_t>(seed), static_cast<uint32_t>(stream),
                          static_cast<uint64_t>(row_offset), cols};
}

inline LinearProjectArgs check_linear_project_args(const at::Tensor& a, const at::Tensor& d, const at::Tensor& z) {
  constexpr const char* op = "linear_project";
  const at::ScalarType compute =
      (a.scalar_type() == at::kDouble || z.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  LinearFactors f = check_linear_factors(a, d, op, compute);
  check_dim(z, op, "z", 3);
  check_same_device(a, z, op, "a", "z");
  check_floating(z, op, "z");
  SVEN_CHECK(z.size(0) == f.d_out && z.size(1) == f.d_in, op, "z must have shape (d_out, d_in, s) = (", f.d_out,
             ", ", f.d_in, ", s), got ", z.sizes());
  const int64_t cols = z.size(2);
  at::Tensor z2 = z.to(compute).contiguous().view({f.params(), cols});
  return LinearProjectArgs{std::move(f), std::move(z2), cols};
}

// Y (R, cols) float64 on the inputs' device, zeros.
inline at::Tensor new_sketch(const at::Tensor& like, int64_t rows, int64_t cols) {
  return at::zeros({rows, cols}, like.options().dtype(at::kDouble));
}

}  // namespace sven_ext
