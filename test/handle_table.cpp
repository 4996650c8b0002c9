// The handle table alone: generations, tags and slot reuse.
#include <doctest/doctest.h>

#include <algorithm>
#include <memory_resource>
#include <random>
#include <set>

#include "lib/handle_table.hpp"
#include "lib/huge_page_resource.hpp"
#include "test/support/seed.hpp"

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

TEST_CASE("slots count as on huge pages only on the huge page resource, in a block of a huge page") {
  using memshuffle::detail::huge_page_resource;
  const std::size_t slots = 2 * huge_page_resource::page_size() / 32;
  handle_table plain(7);
  handle_table huge(8, 0, &huge_page_resource::instance());
  for (std::size_t i = 0; i < 100; ++i) take(plain), take(huge);
  CHECK(huge.huge_page_bytes() == 0);  // 100 slots: a block of new and delete
  for (std::size_t i = 100; i < slots; ++i) take(plain), take(huge);
  CHECK(plain.huge_page_bytes() == 0);
  CHECK(huge.huge_page_bytes() == (huge_page_resource::advice_taken() ? huge.metadata_bytes() : 0));
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
  MEMSHUFFLE_TEST_SEED(seed);
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

TEST_SUITE("shuffler") {

namespace {

// Counts the blocks given back with anything but zeros in them.
class wipe_checking_resource : public std::pmr::memory_resource {
 public:
  std::size_t dirty = 0, returned = 0;

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    return std::pmr::new_delete_resource()->allocate(bytes, alignment);
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    const auto* b = static_cast<const unsigned char*>(p);
    ++returned;
    if (std::any_of(b, b + bytes, [](unsigned char c) { return c != 0; })) ++dirty;
    std::pmr::new_delete_resource()->deallocate(p, bytes, alignment);
  }
  bool do_is_equal(const std::pmr::memory_resource& o) const noexcept override { return this == &o; }
};

}  // namespace

TEST_CASE("storage the table gives back when it grows, or when it ends, is wiped first") {
  wipe_checking_resource storage;
  {
    handle_table t(5, 0, &storage);
    for (int i = 0; i < 1000; ++i) {
      const std::uint32_t k = take(t);
      t[k].data = reinterpret_cast<std::byte*>(std::uintptr_t{0x1234'5678'9ABC} + k);  // an entry address
      t[k].aux = 0xFEED'F00D + k;                                                         // a counter
    }
    CHECK(storage.returned >= 4);  // 64 -> 128 -> ... -> 1024 slots
  }
  CHECK(storage.dirty == 0);
}

TEST_CASE("a table with a first generation hands out no handle below it") {
  handle_table t(9, 12345);
  const std::uint32_t i = take(t);
  const handle h = t.handle_of(i);
  CHECK(t.find(h) == &t[i]);
  CHECK(t.generations_used() == 12346);
  handle_table older(9);
  const handle old = older.handle_of(take(older));
  CHECK(t.find(old) == nullptr);
}

TEST_CASE("the tag registry gives a tag to one table at a time, and never below its generations used") {
  std::vector<memshuffle::detail::tag_grant> held;
  std::set<std::uint16_t> tags;
  for (int i = 0; i < 1000; ++i) {
    held.push_back(memshuffle::detail::acquire_tag());
    CHECK(held.back().tag != 0);
    CHECK(tags.insert(held.back().tag).second);
  }
  const auto again = held.front();
  for (const auto& g : held) memshuffle::detail::release_tag(g.tag, g.first_generation + 77);
  // Every tag comes back in time; the one seen first must start above what it used.
  for (int i = 0; i < 0x10000; ++i) {
    const auto g = memshuffle::detail::acquire_tag();
    memshuffle::detail::release_tag(g.tag, g.first_generation);
    if (g.tag == again.tag) {
      CHECK(g.first_generation >= again.first_generation + 77);
      break;
    }
  }
}

}  // TEST_SUITE
