// The heap's index of chunks by address, on its own, against a plain map.
#include <doctest/doctest.h>

#include "lib/chunk_index.hpp"
#include "test/support/seed.hpp"

#include <cstdint>
#include <iterator>
#include <map>
#include <random>
#include <vector>

using memshuffle::detail::chunk_index;

TEST_SUITE("shuffler") {

TEST_CASE("a chunk index finds the chunk holding an address and nothing between chunks") {
  chunk_index<int> index;
  int a = 0, b = 0;
  index.reserve_one();
  index.insert(1000, 1100, &a);
  index.reserve_one();
  index.insert(500, 600, &b);
  CHECK(index.find(1000) == &a);
  CHECK(index.find(1099) == &a);
  CHECK(index.find(1100) == nullptr);
  CHECK(index.find(550) == &b);
  CHECK(index.find(499) == nullptr);
  CHECK(index.find(700) == nullptr);
  index.erase(1000);
  CHECK(index.find(1050) == nullptr);
  CHECK(index.live() == 1);
}

TEST_CASE("a chunk index erased and refilled at random agrees with a map, chunks reusing freed addresses") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  chunk_index<int> index;
  std::map<std::uintptr_t, std::uintptr_t> model;  // begin -> end
  std::vector<int> owners(1000);
  // Chunks of 1 to 4 units of 64 bytes at 400 unit positions: freed addresses are taken
  // again by chunks that start elsewhere in them, as an upstream reuses memory.
  const auto overlaps = [&](std::uintptr_t b, std::uintptr_t e) {
    auto it = model.lower_bound(e);
    return it != model.begin() && std::prev(it)->second > b;
  };
  for (int round = 0; round < 20000; ++round) {
    if (!model.empty() && rng() % 2 == 0) {
      auto it = model.begin();
      std::advance(it, static_cast<long>(rng() % model.size()));
      index.erase(it->first);
      model.erase(it);
    } else {
      const std::uintptr_t b = 64 * (1 + rng() % 400), e = b + 64 * (1 + rng() % 4);
      if (overlaps(b, e)) continue;
      index.reserve_one();
      index.insert(b, e, &owners[(b / 64) % owners.size()]);
      model[b] = e;
    }
    REQUIRE(index.live() == model.size());
    for (int probe = 0; probe < 8; ++probe) {
      const std::uintptr_t at = rng() % (64 * 410);
      auto it = model.upper_bound(at);
      const bool in = it != model.begin() && at < std::prev(it)->second;
      CAPTURE(at);
      CHECK(index.find(at) == (in ? &owners[(std::prev(it)->first / 64) % owners.size()] : nullptr));
    }
  }
  std::uintptr_t last = 0;
  std::size_t seen = 0;
  index.for_each([&](const auto& c) {
    CHECK(c.begin >= last);
    last = c.end;
    ++seen;
  });
  CHECK(seen == model.size());
}

}
