// Philox4x32-10 counter-based generator (Salmon et al., SC'11), shared by the
// CPU and CUDA kernels so both produce the same bits.
//
// Every entry of the virtual random matrix Omega is a pure function of
// (seed, stream, row, col): no state, no dependence on launch shape, thread
// count or chunking. A block of a huge matrix can therefore be regenerated
// on its own, anywhere, which is how the sketch never stores Omega.
//
// Counter layout for entry (row, col):
//   ctr = {col >> 1, row & 0xffffffff, row >> 32, stream},  key = seed (64 bit)
// One Philox call yields four 32-bit words; a Gaussian pair (Box-Muller on
// two 53-bit uniforms) serves columns 2m and 2m+1, so neighbouring columns
// share one call when a kernel computes them together.
#pragma once

#include <cstdint>
#include <math.h>

#include "sven_ext/macros.h"

namespace sven_ext {

struct PhiloxWords {
  uint32_t w[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

SVEN_HOST_DEVICE SVEN_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The raw generator: counter (4 words) and key (2 words) to 4 words.
SVEN_HOST_DEVICE SVEN_INLINE PhiloxWords philox4x32_10(PhiloxWords ctr, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, ctr.w[0]);
    const uint32_t lo0 = kPhiloxM0 * ctr.w[0];
    const uint32_t hi1 = mulhi32(kPhiloxM1, ctr.w[2]);
    const uint32_t lo1 = kPhiloxM1 * ctr.w[2];
    ctr = PhiloxWords{{hi1 ^ ctr.w[1] ^ k0, lo1, hi0 ^ ctr.w[3] ^ k1, lo0}};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ctr;
}

// The words behind entries (row, 2m) and (row, 2m + 1) of stream `stream`.
SVEN_HOST_DEVICE SVEN_INLINE PhiloxWords philox_entry_words(uint64_t seed, uint32_t stream, uint64_t row,
                                                            uint64_t col) {
  const PhiloxWords ctr{{static_cast<uint32_t>(col >> 1), static_cast<uint32_t>(row),
                         static_cast<uint32_t>(row >> 32), stream}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A uniform double in the open interval (0, 1) from 64 random bits (53 used).
SVEN_HOST_DEVICE SVEN_INLINE double uniform_open01(uint32_t hi, uint32_t lo) {
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  return (static_cast<double>(bits) + 0.5) * 0x1.0p-53;
}

struct GaussianPair {
  double even;  // the entry in column 2m
  double odd;   // the entry in column 2m + 1
};

// Box-Muller in double precision on one Philox call.
SVEN_HOST_DEVICE SVEN_INLINE GaussianPair gaussian_pair(const PhiloxWords& x) {
  const double u_radius = uniform_open01(x.w[0], x.w[1]);
  const double u_angle = uniform_open01(x.w[2], x.w[3]);
  const double radius = sqrt(-2.0 * log(u_radius));
  const double angle = 6.283185307179586476925286766559 * u_angle;
  return GaussianPair{radius * cos(angle), radius * sin(angle)};
}

// Standard normal entry (row, col) of the virtual matrix.
SVEN_HOST_DEVICE SVEN_INLINE double gaussian_entry(uint64_t seed, uint32_t stream, uint64_t row, uint64_t col) {
  const GaussianPair pair = gaussian_pair(philox_entry_words(seed, stream, row, col));
  return (col & 1) ? pair.odd : pair.even;
}

// +1 / -1 entry (row, col): the low bit of the word that belongs to this column.
SVEN_HOST_DEVICE SVEN_INLINE double rademacher_entry(uint64_t seed, uint32_t stream, uint64_t row, uint64_t col) {
  const PhiloxWords x = philox_entry_words(seed, stream, row, col);
  return (x.w[col & 1] & 1u) ? 1.0 : -1.0;
}

enum class Distribution : int { kGaussian = 0, kRademacher = 1 };

SVEN_HOST_DEVICE SVEN_INLINE double random_entry(Distribution dist, uint64_t seed, uint32_t stream, uint64_t row,
                                                 uint64_t col) {
  return dist == Distribution::kGaussian ? gaussian_entry(seed, stream, row, col)
                                         : rademacher_entry(seed, stream, row, col);
}

}  // namespace sven_ext
