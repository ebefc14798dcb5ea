// CPU impls of the Gram ops.
//
// seq_gram: per pair of tiles (upper triangle, see sven_ext/gram_tile.h) and
// pair of step chunks, two library GEMMs give Sa = A_I A_J^T and Sd = D_I D_J^T
// for the tiles' rows (at most 512 x 512 each, a few MB); one fused
// pass multiplies them entrywise and reduces each sample-pair block in float64
// straight into K. Float16/bfloat16 inputs are computed in float32.
//
// embedding_gram: tokens are grouped by index value (a stable sort), so only
// token pairs that share a value are visited: for every sample i and every value
// v it holds, S_i[v] = sum of its D rows with that value is formed once in
// float64 and dotted with the D rows of the later samples holding v. The cost is
// sum over values of (samples holding it)^2 * Dd, at most B^2 T Dd, and no
// workspace beyond one Dd vector per thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../torch/gram.h"
#include "sven_ext/gram_tile.h"

namespace sven_ext {
namespace {

// Rows of A (or D) per tile: Sa and Sd are at most 512 x 512 (2 MB each in float64).
// Tiles shrink (not below 128 rows, where the GEMMs lose speed) until there are
// enough tile pairs to give every thread several.
constexpr int64_t kMaxTileRows = 512;
constexpr int64_t kMinTileRows = 128;
constexpr int64_t kPairsPerThread = 4;
// Multiply-adds below which a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

// K as zeros, filled on this thread: at::zeros would open a parallel region for
// a fill that costs less than waking the other threads.
at::Tensor new_gram_cpu(const at::Tensor& like, int64_t batch) {
  at::Tensor k = at::empty({batch, batch}, like.options().dtype(at::kDouble));
  std::fill_n(k.mutable_data_ptr<double>(), batch * batch, 0.0);
  return k;
}

// Copies the upper triangle of the (n, n) row-major matrix into the lower one.
void mirror_upper(double* k, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) k[j * n + i] = k[i * n + j];
}

// Per-task buffers of the seq_gram tile products.
struct TileWorkspace {
  at::Tensor sa, sd;  // flat, tile_rows^2 entries each
  std::vector<double> partial;
};

// Adds sum over each (ci x cj) block of sa * sd to K[first_i + si, first_j + sj].
// sa, sd: (ni * ci, nj * cj) row-major. Rows are reduced in parallel into
// `partial` (no shared writes), then added to K in a fixed order, so the result
// does not depend on the thread count. On a diagonal tile pair only the blocks
// with sj >= si (the upper triangle of K) are reduced.
template <typename scalar_t>
void reduce_tile(const scalar_t* sa, const scalar_t* sd, int64_t ni, int64_t ci, int64_t nj, int64_t cj,
                 bool diagonal, double* k_block, int64_t ldk, std::vector<double>& partial) {
  const int64_t rows = ni * ci, cols = nj * cj;
  partial.assign(static_cast<size_t>(rows * nj), 0.0);
  double* part = partial.data();
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinParallelWork / 8 / cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t first_sj = diagonal ? r / ci : 0;
      for (int64_t sj = first_sj; sj < nj; ++sj) {
        const int64_t offset = r * cols + sj * cj;
        part[r * nj + sj] = hadamard_sum(sa + offset, sd + offset, cj);
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t si = r / ci;
    for (int64_t sj = diagonal ? si : 0; sj < nj; ++sj) k_block[si * ldk + sj] += part[r * nj + sj];
  }
}

// Every chunk pair of one tile pair: K[tile_i samples, tile_j samples] += ...
template <typename scalar_t>
void seq_gram_tile_pair(const at::Tensor& af, const at::Tensor& df, const GramTiling& g, TrianglePair tiles,
                        double* k, TileWorkspace& ws) {
  const int64_t ni = g.samples_in_tile(tiles.first), nj = g.samples_in_tile(tiles.second);
  const int64_t first_i = tiles.first * g.samples_per_tile, first_j = tiles.second * g.samples_per_tile;
  const bool diagonal = tiles.first == tiles.second;
  double* k_block = k + first_i * g.samples + first_j;
  // A chunk's rows are contiguous: either whole samples (t0 == 0, chunk == T) or one sample.
  for (int64_t t0 = 0; t0 < g.steps; t0 += g.step_chunk) {
    const int64_t ci = g.steps_in_chunk(t0), rows = ni * ci;
    const at::Tensor a_rows = af.narrow(0, first_i * g.steps + t0, rows);
    const at::Tensor d_rows = df.narrow(0, first_i * g.steps + t0, rows);
    for (int64_t u0 = 0; u0 < g.steps; u0 += g.step_chunk) {
      const int64_t cj = g.steps_in_chunk(u0), cols = nj * cj;
      at::Tensor sa = ws.sa.narrow(0, 0, rows * cols).view({rows, cols});
      at::Tensor sd = ws.sd.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(sa, a_rows, af.narrow(0, first_j * g.steps + u0, cols).t());
      at::mm_out(sd, d_rows, df.narrow(0, first_j * g.steps + u0, cols).t());
      reduce_tile(sa.const_data_ptr<scalar_t>(), sd.const_data_ptr<scalar_t>(), ni, ci, nj, cj, diagonal, k_block,
                  g.samples, ws.partial);
    }
  }
}

at::Tensor seq_gram_cpu(const at::Tensor& a_in, const at::Tensor& d_in) {
  SeqGramArgs args = check_seq_gram_args(a_in, d_in);
  const int64_t batch = args.batch, steps = args.steps;
  at::Tensor k = new_gram_cpu(args.a, batch);
  if (batch == 0 || steps == 0 || args.a_features == 0 || args.d_features == 0) return k;
  at::Tensor a = args.a, d = args.d;
  if (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16) {
    // The library GEMM is fastest in float32, and float32 products lose nothing here.
    a = a.to(at::kFloat);
    d = d.to(at::kFloat);
  }
  const at::Tensor af = a.view({batch * steps, args.a_features});
  const at::Tensor df = d.view({batch * steps, args.d_features});
  const int64_t enough_pairs = kPairsPerThread * at::get_num_threads();
  int64_t tile_rows = kMaxTileRows;
  GramTiling g = make_gram_tiling(batch, steps, tile_rows);
  while (tile_rows > kMinTileRows && g.tile_pairs() < enough_pairs) {
    tile_rows /= 2;
    g = make_gram_tiling(batch, steps, tile_rows);
  }
  const int64_t pairs = g.tile_pairs();
  double* k_data = k.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(af.scalar_type(), "seq_gram_cpu", [&] {
    // Tile pairs own disjoint blocks of K. With a few per thread, each thread
    // takes a share of whole pairs (the GEMMs inside run single-threaded, one
    // barrier in all); with fewer (small inputs), one pair at a time with the
    // GEMMs and the reduction parallel inside.
    const int64_t grain = pairs >= 2 * at::get_num_threads() ? 1 : pairs;
    at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
      TileWorkspace ws{at::empty({tile_rows * tile_rows}, af.options()),
                       at::empty({tile_rows * tile_rows}, af.options()), {}};
      for (int64_t p = begin; p < end; ++p) seq_gram_tile_pair<scalar_t>(af, df, g, triangle_pair(p), k_data, ws);
    });
  });
  mirror_upper(k_data, batch);
  return k;
}

// Tokens grouped by index value: "items" are the runs of one sample's tokens
// with one value; a value's items are consecutive and in increasing sample order.
struct TokenGroups {
  std::vector<int64_t> item_begin;   // into `order`; one past the last item: order.size()
  std::vector<int64_t> item_sample;
  std::vector<int64_t> group_end;    // per item: one past the last item with its value
  std::vector<int64_t> sample_item_begin;  // per sample, into `sample_items`; B + 1 entries
  std::vector<int64_t> sample_items;
  int64_t token_visits = 0;  // D rows read by all rows of K together: the work, in units of Dd
};

TokenGroups group_tokens(const int64_t* values, const int64_t* order, int64_t n, int64_t batch, int64_t steps) {
  TokenGroups tg;
  for (int64_t p = 0; p < n; ++p) {
    const int64_t sample = order[p] / steps;
    if (p == 0 || values[p] != values[p - 1] || sample != tg.item_sample.back()) {
      tg.item_begin.push_back(p);
      tg.item_sample.push_back(sample);
    }
  }
  const int64_t items = static_cast<int64_t>(tg.item_sample.size());
  tg.item_begin.push_back(n);
  tg.group_end.resize(items);
  for (int64_t u = items - 1; u >= 0; --u) {
    const bool last_of_value = u == items - 1 || values[tg.item_begin[u]] != values[tg.item_begin[u + 1]];
    tg.group_end[u] = last_of_value ? u + 1 : tg.group_end[u + 1];
  }
  // Item w's tokens are read once to form its sum and once for each item u <= w of its value.
  for (int64_t w = 0, group_first = 0; w < items; ++w) {
    if (w == 0 || tg.group_end[w - 1] != tg.group_end[w]) group_first = w;
    tg.token_visits += (tg.item_begin[w + 1] - tg.item_begin[w]) * (w - group_first + 2);
  }
  tg.sample_item_begin.assign(batch + 1, 0);
  for (int64_t u = 0; u < items; ++u) ++tg.sample_item_begin[tg.item_sample[u] + 1];
  for (int64_t i = 0; i < batch; ++i) tg.sample_item_begin[i + 1] += tg.sample_item_begin[i];
  tg.sample_items.resize(items);
  std::vector<int64_t> fill(tg.sample_item_begin.begin(), tg.sample_item_begin.end() - 1);
  for (int64_t u = 0; u < items; ++u) tg.sample_items[fill[tg.item_sample[u]]++] = u;
  return tg;
}

// Row i of the upper triangle of K: sum over sample i's items u and the items w
// of the same value from samples j >= i of <S_i[v], S_j[v]>.
template <typename scalar_t>
void embedding_gram_row(int64_t i, const TokenGroups& tg, const int64_t* order, const scalar_t* d, int64_t features,
                        double* k_row, std::vector<double>& item_sum) {
  for (int64_t q = tg.sample_item_begin[i]; q < tg.sample_item_begin[i + 1]; ++q) {
    const int64_t u = tg.sample_items[q];
    std::fill(item_sum.begin(), item_sum.end(), 0.0);
    for (int64_t p = tg.item_begin[u]; p < tg.item_begin[u + 1]; ++p) {
      const scalar_t* row = d + order[p] * features;
      for (int64_t f = 0; f < features; ++f) item_sum[f] += static_cast<double>(row[f]);
    }
    for (int64_t w = u; w < tg.group_end[u]; ++w) {
      double dot = 0.0;
      for (int64_t p = tg.item_begin[w]; p < tg.item_begin[w + 1]; ++p)
        dot += hadamard_sum(item_sum.data(), d + order[p] * features, features);
      k_row[tg.item_sample[w]] += dot;
    }
  }
}

at::Tensor embedding_gram_cpu(const at::Tensor& indices_in, const at::Tensor& d_in) {
  EmbeddingGramArgs args = check_embedding_gram_args(indices_in, d_in);
  const int64_t batch = args.batch, steps = args.steps, features = args.d_features;
  at::Tensor k = new_gram_cpu(args.d, batch);
  if (batch == 0 || steps == 0 || features == 0) return k;
  at::Tensor d = args.d;
  if (d.scalar_type() == at::kHalf || d.scalar_type() == at::kBFloat16) d = d.to(at::kFloat);
  const int64_t n = batch * steps;
  // A stable sort keeps the tokens of one value in (sample, step) order.
  const auto sorted = at::sort(args.indices.view({n}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor values = std::get<0>(sorted), order = std::get<1>(sorted);
  const TokenGroups tg =
      group_tokens(values.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), n, batch, steps);
  double* k_data = k.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "embedding_gram_cpu", [&] {
    const scalar_t* d_data = d.const_data_ptr<scalar_t>();
    const int64_t* order_data = order.const_data_ptr<int64_t>();
    // Row i of the upper triangle costs about (B - i); pairing rows q and B-1-q
    // gives every task the same share. Each task writes only its own rows of K.
    // Small problems (few shared values) stay on one thread: waking others costs more.
    const int64_t row_pairs = (batch + 1) / 2;
    const int64_t work = tg.token_visits * features;
    const int64_t grain = work <= kMinParallelWork ? row_pairs : std::max<int64_t>(1, row_pairs * kMinParallelWork / work);
    at::parallel_for(0, row_pairs, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> item_sum(static_cast<size_t>(features));
      for (int64_t q = begin; q < end; ++q) {
        embedding_gram_row(q, tg, order_data, d_data, features, k_data + q * batch, item_sum);
        const int64_t mirror = batch - 1 - q;
        if (mirror != q) embedding_gram_row(mirror, tg, order_data, d_data, features, k_data + mirror * batch, item_sum);
      }
    });
  });
  mirror_upper(k_data, batch);
  return k;
}

}  // namespace

TORCH_LIBRARY_IMPL(sven_ext, CPU, m) {
  m.impl("seq_gram", &seq_gram_cpu);
  m.impl("embedding_gram", &embedding_gram_cpu);
}

}  // namespace sven_ext
