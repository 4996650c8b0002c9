// The incremental shuffle's random order of slots, on its own.
#include <doctest/doctest.h>

#include "lib/index_permutation.hpp"

#include <cstdint>
#include <vector>

using memshuffle::detail::index_permutation;
using memshuffle::detail::layout_rng;

namespace {

// Whether p maps 0 .. n - 1 onto itself, each index once.
bool is_permutation(const index_permutation& p) {
  std::vector<bool> seen(p.size());
  for (std::uint64_t i = 0; i < p.size(); ++i) {
    const std::uint64_t x = p(i);
    if (x >= p.size() || seen[x]) return false;
    seen[x] = true;
  }
  return true;
}

}  // namespace

TEST_SUITE("shuffler") {

TEST_CASE("an index permutation maps every size onto itself, each index once") {
  layout_rng rng(7);
  for (std::uint64_t n : {1u, 2u, 3u, 4u, 5u, 17u, 255u, 256u, 257u, 1000u, 4097u, 65535u}) {
    CAPTURE(n);
    CHECK(is_permutation(index_permutation(n, &rng)));
    CHECK(is_permutation(index_permutation(n, nullptr)));
  }
}

TEST_CASE("an index permutation without a generator keeps the order") {
  const index_permutation p(100, nullptr);
  for (std::uint64_t i = 0; i < 100; ++i) CHECK(p(i) == i);
}

TEST_CASE("a random index permutation sends each index anywhere with equal chance") {
  // Where index 0 goes, over many keys, in 8 bins of a domain of 1000: each bin about
  // an eighth. Chi-square with 7 degrees of freedom; 24.3 is its 0.999 quantile.
  layout_rng rng(11);
  constexpr int trials = 8000, bins = 8;
  std::vector<int> count(bins);
  int fixed_points = 0;
  for (int t = 0; t < trials; ++t) {
    const index_permutation p(1000, &rng);
    ++count[static_cast<std::size_t>(p(0) * bins / 1000)];
    fixed_points += p(500) == 500;
  }
  double chi2 = 0;
  for (int c : count) chi2 += (c - trials / bins) * (c - trials / bins) / double(trials / bins);
  MESSAGE("chi-square of where index 0 goes: ", chi2);
  CHECK(chi2 < 24.3);
  CHECK(fixed_points < 30);  // 8 expected of a uniform permutation
}

TEST_CASE("a random index permutation moves neighbours apart") {
  layout_rng rng(3);
  const index_permutation p(1 << 16, &rng);
  int adjacent = 0;
  for (std::uint64_t i = 0; i + 1 < p.size(); ++i) {
    const std::uint64_t a = p(i), b = p(i + 1);
    adjacent += (a > b ? a - b : b - a) == 1;
  }
  CHECK(adjacent < 20);  // about 2 expected at random; the identity has 65535
}

}
