#pragma once
// The seed of every randomized test. MEMSHUFFLE_SEED=N replays a failure: the whole
// run then draws from N. Otherwise a fresh seed per test case. MEMSHUFFLE_TEST_SEED
// declares `seed` and names it in the failure message of the test case it is used in,
// with the line that replays it.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <random>

namespace memshuffle::testing {

inline std::uint64_t test_seed() {
  if (const char* s = std::getenv("MEMSHUFFLE_SEED")) return std::strtoull(s, nullptr, 10);
  std::random_device rd;
  return (std::uint64_t{rd()} << 32) | rd();
}

}  // namespace memshuffle::testing

#define MEMSHUFFLE_TEST_SEED(seed)                              \
  const std::uint64_t seed = ::memshuffle::testing::test_seed(); \
  INFO("replay with MEMSHUFFLE_SEED=", seed)
