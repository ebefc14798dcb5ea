// Host-side argument handling of the Gram ops, shared by the CPU and CUDA impls.
//
// Non-contiguous inputs are accepted and copied to contiguous ones here (the
// kernels read rows of the flattened (B * T, features) factors); contiguous
// inputs are used as they are.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace sven_ext {

struct SeqGramArgs {
  at::Tensor a;  // (B, T, Da), contiguous
  at::Tensor d;  // (B, T, Dd), contiguous, same dtype and device as a
  int64_t batch, steps, a_features, d_features;
};

struct EmbeddingGramArgs {
  at::Tensor indices;  // (B, T) int64, contiguous
  at::Tensor d;        // (B, T, Dd), contiguous, same device as indices
  int64_t batch, steps, d_features;
};

inline void check_same_batch_and_steps(const at::Tensor& x, const at::Tensor& d, const char* op, const char* name) {
  SVEN_CHECK(x.size(0) == d.size(0), op, name, " and d must have the same batch size B (dim 0), got ", name, " ",
             x.sizes(), " and d ", d.sizes());
  SVEN_CHECK(x.size(1) == d.size(1), op, name, " and d must have the same sequence length T (dim 1), got ", name,
             " ", x.sizes(), " and d ", d.sizes());
}

inline SeqGramArgs check_seq_gram_args(const at::Tensor& a, const at::Tensor& d) {
  constexpr const char* op = "seq_gram";
  check_factor_pair(a, d, op);
  check_same_batch_and_steps(a, d, op, "a");
  return SeqGramArgs{a.contiguous(), d.contiguous(), a.size(0), a.size(1), a.size(2), d.size(2)};
}

inline EmbeddingGramArgs check_embedding_gram_args(const at::Tensor& indices, const at::Tensor& d) {
  constexpr const char* op = "embedding_gram";
  check_dim(indices, op, "indices", 2);
  check_dim(d, op, "d", 3);
  check_same_device(indices, d, op, "indices", "d");
  check_dtype(indices, op, "indices", at::kLong);
  check_floating(d, op, "d");
  check_same_batch_and_steps(indices, d, op, "indices");
  return EmbeddingGramArgs{indices.contiguous(), d.contiguous(), d.size(0), d.size(1), d.size(2)};
}

// K is (B, B) float64 on the inputs' device; zeros, so empty reductions need no kernel.
// (The CPU impl fills its own zeros on one thread.)
inline at::Tensor new_gram(const at::Tensor& like, int64_t batch) {
  return at::zeros({batch, batch}, like.options().dtype(at::kDouble));
}

}  // namespace sven_ext
