// The handle table alone: generations, tags and slot reuse.
#include <doctest/doctest.h>

#include <random>
#include <set>

#include "lib/handle_table.hpp"

using memshuffle::handle;
using memshuffle::invalid_handle;
using memshuffle::detail::entry_state;
using memshuffle::detail::handle_table;

namespace {

// A slot taken the way the shuffler takes one: reserve, acquire, mark live.
std::uint32_t take(handle_table& t) {
  t.reserve_one();
  const std::uint32_t i = t.acquire();
  t[i].set(entry_state::at_rest);
  return i;
}

// Freed the way the shuffler frees: invalid at once, the slot reusable later.
void drop(handle_table& t, std::uint32_t i) {
  t.invalidate(i);
  t.recycle(i);
}

}  // namespace

TEST_SUITE("shuffler") {

TEST_CASE("a table slot is 32 bytes and metadata_bytes counts them") {
  handle_table t(7);
  for (int i = 0; i < 10; ++i) take(t);
  CHECK(t.slots() == 10);
  CHECK(t.metadata_bytes() == 10 * 32);
}

TEST_CASE("every handle finds its own slot and none equals invalid_handle") {
  handle_table t(1);
  std::set<std::uint64_t> seen;
  for (int i = 0; i < 1000; ++i) {
    const std::uint32_t slot = take(t);
    const handle h = t.handle_of(slot);
    CHECK(h != invalid_handle);
    CHECK(seen.insert(static_cast<std::uint64_t>(h)).second);
    REQUIRE(t.find(h) == &t[slot]);
    CHECK(t.index_of(h) == slot);
  }
}

TEST_CASE("a freed entry's handle is stale at once and stays stale after the slot is reused") {
  handle_table t(3);
  const std::uint32_t a = take(t);
  const handle old = t.handle_of(a);
  t.invalidate(a);
  CHECK(t.find(old) == nullptr);
  t.recycle(a);
  const std::uint32_t b = take(t);
  CHECK(b == a);  // the slot is reused...
  const handle fresh = t.handle_of(b);
  CHECK(fresh != old);  // ...under a new generation
  CHECK(t.find(old) == nullptr);
  CHECK(t.find(fresh) == &t[b]);
}

TEST_CASE("a handle from a table with another tag is never found") {
  handle_table mine(10), other(11);
  const std::uint32_t i = take(mine);
  const std::uint32_t j = take(other);
  REQUIRE(i == j);  // same slot and generation: only the tag differs
  CHECK(mine.find(other.handle_of(j)) == nullptr);
  CHECK(other.find(mine.handle_of(i)) == nullptr);
}

TEST_CASE("doomed and unused slots are never found, even with the right generation") {
  handle_table t(5);
  const std::uint32_t i = take(t);
  const handle h = t.handle_of(i);
  t[i].set(entry_state::doomed);
  CHECK(t.find(h) == nullptr);
  t[i].set(entry_state::unused);
  CHECK(t.find(h) == nullptr);
}

TEST_CASE("garbage handles are not found") {
  handle_table t(9);
  for (int i = 0; i < 100; ++i) take(t);
  const auto seed = std::random_device{}();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  int found = 0;
  for (int i = 0; i < 100000; ++i) {
    const auto h = static_cast<handle>(rng());
    if (t.find(h) != nullptr) ++found;
  }
  CHECK(found == 0);  // a random value matches tag, index and generation 1 time in 2^36
  CHECK(t.find(invalid_handle) == nullptr);
}

TEST_CASE("a slot whose generations are used up is retired instead of reused") {
  handle_table t(2);
  const std::uint32_t i = take(t);
  const handle first = t.handle_of(i);
  for (std::uint32_t g = 0; g < handle_table::max_generation; ++g) {
    drop(t, i);
    if (take(t) != i) FAIL("slot not reused at generation " << g);
  }
  CHECK(t[i].generation == handle_table::max_generation);
  drop(t, i);
  const std::uint32_t next = take(t);
  CHECK(next != i);  // retired: a fresh slot instead
  CHECK(t.find(first) == nullptr);
}

TEST_CASE("a free slot is reused before the table grows") {
  handle_table t(4);
  const std::uint32_t a = take(t);
  take(t);
  drop(t, a);
  CHECK(take(t) == a);
  CHECK(t.slots() == 2);
}

}  // TEST_SUITE
