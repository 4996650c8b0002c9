#pragma once
// A random permutation of 0 .. n - 1 computed one index at a time, with no table: a
// four-round Feistel network on the smallest even number of bits that covers n, and
// cycle walking (an image at or above n is permuted again until it falls below n). So
// an incremental shuffle visits the slots in random order at O(1) memory and O(1)
// expected work per index, where a shuffled list of every slot cost O(heap) at a
// pass's start. The domain is less than 4n, so a walk takes fewer than four rounds of
// the network on average.
#include <algorithm>
#include <bit>
#include <cstdint>

#include "layout_rng.hpp"

namespace memshuffle::detail {

class index_permutation {
 public:
  index_permutation() = default;
  // With rng null: the identity (the slots in order).
  index_permutation(std::uint64_t n, layout_rng* rng) noexcept : n_(n), random_(rng != nullptr) {
    if (!random_) return;
    half_ = std::max<unsigned>(1, (static_cast<unsigned>(std::bit_width(n > 1 ? n - 1 : 1)) + 1) / 2);
    for (auto& k : keys_) k = (*rng)();
  }

  std::uint64_t size() const noexcept { return n_; }

  // The image of i (i < size()).
  std::uint64_t operator()(std::uint64_t i) const noexcept {
    if (!random_) return i;
    do i = network(i);
    while (i >= n_);
    return i;
  }

 private:
  std::uint64_t network(std::uint64_t x) const noexcept {
    const std::uint64_t mask = (std::uint64_t{1} << half_) - 1;
    std::uint64_t left = x >> half_, right = x & mask;
    for (const std::uint64_t k : keys_) {
      const std::uint64_t next = left ^ (mix(right ^ k) & mask);
      left = right;
      right = next;
    }
    return (left << half_) | right;
  }
  // A 64-bit finalizer (splitmix64's): every input bit reaches every output bit.
  static std::uint64_t mix(std::uint64_t z) noexcept {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
    return z ^ (z >> 31);
  }

  std::uint64_t n_ = 0;
  unsigned half_ = 1;
  bool random_ = false;
  std::uint64_t keys_[4] = {};
};

}  // namespace memshuffle::detail
