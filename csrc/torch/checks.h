// Input checks shared by every op's host wrapper, CPU and CUDA alike.
// Each message starts with the op's name so a failing call says where it failed.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace sven_ext {

#define SVEN_CHECK(cond, op, ...) TORCH_CHECK((cond), "sven_ext.", (op), ": ", __VA_ARGS__)

inline void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  SVEN_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// For tensors written in place: a copy would not be the caller's tensor.
inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  SVEN_CHECK(t.is_contiguous(), op, name, " must be contiguous (it is written in place), got strides ", t.strides());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  SVEN_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kHalf ||
                 t.scalar_type() == at::kBFloat16,
             op, name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  SVEN_CHECK(t.scalar_type() == dtype, op, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                              const char* name_b) {
  SVEN_CHECK(a.device() == b.device(), op, name_a, " and ", name_b, " must be on one device, got ", a.device(),
             " and ", b.device());
}

inline void check_non_negative(int64_t value, const char* op, const char* name) {
  SVEN_CHECK(value >= 0, op, name, " must be >= 0, got ", value);
}

// offset + count <= limit for offset, count >= 0, tested without forming the sum
// (which could overflow int64 and wrap to a small value that passes a plain test).
inline void check_span(int64_t offset, int64_t count, int64_t limit, const char* op, const char* offset_name,
                       const char* count_name, const char* limit_text) {
  SVEN_CHECK(count <= limit && offset <= limit - count, op, offset_name, " + ", count_name, " must be <= ",
             limit_text, ", got ", offset_name, " ", offset, " and ", count_name, " ", count);
}

// A (rows, steps, features) factor pair `a`, `d` of one layer: 3-D, one device, one floating dtype.
inline void check_factor_pair(const at::Tensor& a, const at::Tensor& d, const char* op) {
  check_dim(a, op, "a", 3);
  check_dim(d, op, "d", 3);
  check_same_device(a, d, op, "a", "d");
  check_floating(a, op, "a");
  check_floating(d, op, "d");
  SVEN_CHECK(a.scalar_type() == d.scalar_type(), op, "a and d must have one dtype, got ", a.scalar_type(), " and ",
             d.scalar_type());
}

}  // namespace sven_ext
