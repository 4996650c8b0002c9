// tracking_resource's table of live allocations, on its own.
#include <doctest/doctest.h>

#include "lib/live_table.hpp"
#include "test/support/seed.hpp"

#include <cstdint>
#include <map>
#include <random>

using memshuffle::allocation_record;
using memshuffle::detail::live_table;

namespace {

void* ptr(std::uintptr_t x) { return reinterpret_cast<void*>(x); }

void insert(live_table& t, const allocation_record& r) {
  if (!t.has_room()) t.grow();
  t.insert(r);
}

}  // namespace

TEST_SUITE("resources") {

TEST_CASE("an empty live table finds nothing") {
  live_table t;
  CHECK(t.find(ptr(64)) == nullptr);
  CHECK(t.size() == 0);
}

TEST_CASE("a live table agrees with a map under random inserts and erases") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  live_table t;
  std::map<std::uintptr_t, std::uint64_t> model;
  for (std::uint64_t step = 1; step < 20000; ++step) {
    // Heap-like addresses: 16-byte steps in a small range, so probe runs collide.
    const std::uintptr_t a = 0x10000 + 16 * (rng() % 4096);
    if (auto* r = t.find(ptr(a))) {
      REQUIRE(model.count(a) == 1);
      CHECK(r->sequence == model[a]);
      t.erase(r);
      model.erase(a);
    } else {
      REQUIRE(model.count(a) == 0);
      insert(t, {ptr(a), 8, 8, step});
      model[a] = step;
    }
    REQUIRE(t.size() == model.size());
  }
  std::size_t seen = 0;
  t.for_each([&](const allocation_record& r) {
    ++seen;
    CHECK(model.at(reinterpret_cast<std::uintptr_t>(r.pointer)) == r.sequence);
  });
  CHECK(seen == model.size());
}

TEST_CASE("a live table keeps at most three quarters of its slots full and clear empties it") {
  live_table t;
  for (std::uintptr_t i = 1; i <= 1000; ++i) insert(t, {ptr(i * 32), 1, 1, i});
  CHECK(t.size() == 1000);
  for (std::uintptr_t i = 1; i <= 1000; ++i) CHECK(t.find(ptr(i * 32)) != nullptr);
  t.clear();
  CHECK(t.size() == 0);
  CHECK(t.find(ptr(32)) == nullptr);
}

}  // TEST_SUITE
