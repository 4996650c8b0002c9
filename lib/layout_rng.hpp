#pragma once
// The random numbers that draw a shuffle's layout. Not for keys (those come from the
// operating system, os_random).
#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>

namespace memshuffle::detail {

// xoshiro256** (Blackman and Vigna): the layout only needs to be unpredictable enough
// to spread entries, and it is drawn once per entry per shuffle, so speed matters.
class layout_rng {
 public:
  explicit layout_rng(std::uint64_t seed) {
    for (auto& w : s_) {  // splitmix64 expands the seed
      seed += 0x9E3779B97F4A7C15;
      std::uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
      w = z ^ (z >> 31);
    }
  }
  std::uint64_t operator()() noexcept {
    const std::uint64_t result = std::rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0], s_[3] ^= s_[1], s_[1] ^= s_[2], s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = std::rotl(s_[3], 45);
    return result;
  }

 private:
  std::uint64_t s_[4];
};

// A number below bound (< 2^32), by multiply-shift instead of a division.
inline std::size_t bounded(layout_rng& rng, std::size_t bound) {
  return static_cast<std::size_t>(((rng() & 0xFFFF'FFFF) * bound) >> 32);
}

template <class T>
void shuffle_range(std::span<T> v, layout_rng& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[bounded(rng, i)]);
}

}  // namespace memshuffle::detail
