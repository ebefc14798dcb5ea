// The single schema registry of the sven_ext op library. Device impls live in
// cpu/<family>.cpp and cuda/<family>.cu; fake (meta) impls in sven_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

// Importing sven_ext._C loads this library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(sven_ext, m) {
  // Raw Philox4x32-10 words: counters (N, 4) int64 holding uint32 values, key = seed.
  m.def("philox_raw(Tensor counters, int seed) -> Tensor");
  // Fills out (rows, cols) with block [row_offset:, col_offset:] of the virtual
  // random matrix identified by (seed, stream).
  m.def("philox_fill_(Tensor(a!) out, int seed, int stream, int row_offset, int col_offset, str distribution) -> ()");
  // Gram matrix K = J J^T (B, B) float64 of a Linear layer with a sequence axis:
  // a (B, T, Da) inputs, d (B, T, Dd) output gradients,
  // K[i, j] = sum_{t, t'} (a_i a_j^T)[t, t'] * (d_i d_j^T)[t, t'].
  m.def("seq_gram(Tensor a, Tensor d) -> Tensor");
  // Gram matrix of an Embedding: indices (B, T) int64, d (B, T, Dd) output gradients,
  // K[i, j] = sum_{t, t'} [indices_i[t] == indices_j[t']] * (d_i[t] . d_j[t']).
  m.def("embedding_gram(Tensor indices, Tensor d) -> Tensor");
  // Sketch of a Linear layer's Jacobian rows: a (R, T, d_in), d (R, T, d_out), per-row
  // gradients G_r = d_r^T a_r flattened row-major (index o * d_in + i); returns
  // Y (R, cols) float64, Y[r, j] = sum_p G_r[p] * Omega[row_offset + p, j] with Omega
  // the virtual random matrix of philox_fill_ for (seed, stream), generated on the fly.
  m.def(
      "linear_sketch(Tensor a, Tensor d, int seed, int stream, int row_offset, int cols, str distribution) -> "
      "Tensor");
  // The same product with a stored z (d_out, d_in, s) in place of Omega: Y (R, s) float64,
  // Y[r, j] = sum_{o, i} G_r[o, i] * z[o, i, j].
  m.def("linear_project(Tensor a, Tensor d, Tensor z) -> Tensor");
  // Writes a block into a row and column subset of each matrix: out (N, R, C) floating,
  // rows (r,) and cols (c,) int64 distinct indices, block (N, r, c) of out's dtype,
  // out[n, rows[i], cols[j]] = block[n, i, j]; every other entry of out is left as it is.
  m.def("block_put_(Tensor(a!) out, Tensor rows, Tensor cols, Tensor block) -> ()");
}
