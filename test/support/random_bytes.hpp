#pragma once
// n bytes drawn from the test's generator, so a seeded run replays them.
#include <cstddef>
#include <random>
#include <vector>

namespace memshuffle::testing {

inline std::vector<std::byte> random_bytes(std::mt19937_64& rng, std::size_t n) {
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng());
  return out;
}

}  // namespace memshuffle::testing
