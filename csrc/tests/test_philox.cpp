// Known-answer and property tests of the torch-free Philox header (run by ctest).
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "sven_ext/philox.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

// Random123 kat_vectors, "philox4x32 10" lines: counter[4] key[2] -> output[4].
struct KnownAnswer {
  uint32_t ctr[4];
  uint32_t key[2];
  uint32_t out[4];
};

const KnownAnswer kKnownAnswers[] = {
    {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
     {0x00000000u, 0x00000000u},
     {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

void test_known_answers() {
  for (const KnownAnswer& kat : kKnownAnswers) {
    const sven_ext::PhiloxWords ctr{{kat.ctr[0], kat.ctr[1], kat.ctr[2], kat.ctr[3]}};
    const sven_ext::PhiloxWords out = sven_ext::philox4x32_10(ctr, kat.key[0], kat.key[1]);
    for (int i = 0; i < 4; ++i) expect(out.w[i] == kat.out[i], "Philox4x32-10 known-answer vector");
  }
}

void test_gaussian_moments() {
  const int rows = 257, cols = 391;
  double sum = 0.0, sum_sq = 0.0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const double z = sven_ext::gaussian_entry(0x1234abcdULL, 7u, r, c);
      sum += z;
      sum_sq += z * z;
    }
  const double n = static_cast<double>(rows) * cols;
  const double mean = sum / n, var = sum_sq / n - mean * mean;
  // Standard errors: 1/sqrt(n) ~ 3e-3 for the mean, sqrt(2/n) ~ 4e-3 for the variance.
  expect(std::fabs(mean) < 0.015, "Gaussian mean near 0");
  expect(std::fabs(var - 1.0) < 0.02, "Gaussian variance near 1");
}

void test_rademacher_balance() {
  long plus = 0, total = 0;
  for (int r = 0; r < 101; ++r)
    for (int c = 0; c < 999; ++c, ++total) {
      const double v = sven_ext::rademacher_entry(99u, 3u, r, c);
      expect(v == 1.0 || v == -1.0, "Rademacher entries are +-1");
      plus += v > 0;
    }
  expect(std::labs(2 * plus - total) < 4 * static_cast<long>(std::sqrt(static_cast<double>(total))),
         "Rademacher signs balanced");
}

void test_streams_and_seeds_differ() {
  expect(sven_ext::gaussian_entry(1, 0, 5, 6) != sven_ext::gaussian_entry(1, 1, 5, 6), "streams differ");
  expect(sven_ext::gaussian_entry(1, 0, 5, 6) != sven_ext::gaussian_entry(2, 0, 5, 6), "seeds differ");
  expect(sven_ext::gaussian_entry(1, 0, 5, 6) != sven_ext::gaussian_entry(1, 0, 6, 6), "rows differ");
  expect(sven_ext::gaussian_entry(1, 0, 5, 6) != sven_ext::gaussian_entry(1, 0, 5, 7), "columns differ");
  // Rows beyond 2^32 use the counter's third word instead of wrapping around.
  expect(sven_ext::gaussian_entry(1, 0, 5, 6) != sven_ext::gaussian_entry(1, 0, 5 + (1ULL << 32), 6),
         "64-bit rows do not wrap");
}

}  // namespace

int main() {
  test_known_answers();
  test_gaussian_moments();
  test_rademacher_balance();
  test_streams_and_seeds_differ();
  if (failures == 0) std::printf("test_philox: all checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
