// The shuffler's shards (shuffler_options::shards): where a thread's allocations go
// (the ordinal it takes and gives back), that any thread reaches any shard's entries,
// the calls that span every shard, the shards' keys derived from a given key, and
// threads in shards of their own over an upstream that is not thread safe (the thread
// sanitizer build runs this suite).
#include <doctest/doctest.h>

#include <crypto++/aes.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <latch>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include <memshuffle/shuffler.hpp>
#include <memshuffle/tracking_resource.hpp>

#include "lib/handle_table.hpp"
#include "lib/key_ring.hpp"
#include "test/support/child_process.hpp"

namespace {

using namespace memshuffle;

std::uint16_t tag_of(handle h) { return static_cast<std::uint16_t>(static_cast<std::uint64_t>(h) >> 48); }

// Runs the rest of a scope as the thread of another ordinal, then back to ordinal 0.
struct as_ordinal {
  explicit as_ordinal(std::size_t o) { detail::set_thread_ordinal(o); }
  ~as_ordinal() { detail::set_thread_ordinal(0); }
};

handle alloc_here(shuffler& s, std::uint64_t value) {
  const handle h = s.create<std::uint64_t>();
  *s.rent<std::uint64_t>(h) = value;
  return h;
}

handle alloc_as(shuffler& s, std::size_t ordinal, std::uint64_t value) {
  const as_ordinal o(ordinal);
  return alloc_here(s, value);
}

// Allocates in a thread of its own, which then ends (and gives its ordinal back).
handle alloc_in_ended_thread(shuffler& s, std::uint64_t value) {
  handle h = invalid_handle;
  std::thread([&] { h = alloc_here(s, value); }).join();
  return h;
}

// A thread that runs f and then stays alive, holding the ordinal it took, until end().
class live_thread {
 public:
  explicit live_thread(std::function<void()> f)
      : thread_([this, f = std::move(f)] {
          f();
          ran_.count_down();
          ended_.wait();
        }) {
    ran_.wait();
  }
  ~live_thread() { end(); }
  live_thread(const live_thread&) = delete;
  live_thread& operator=(const live_thread&) = delete;
  void end() {
    if (!thread_.joinable()) return;
    ended_.count_down();
    thread_.join();
  }

 private:
  std::latch ran_{1}, ended_{1};
  std::thread thread_;  // last: it starts once the latches exist
};

std::uint64_t value_of(shuffler& s, handle h) { return *s.rent<const std::uint64_t>(h); }

}  // namespace

TEST_SUITE("shuffler") {

TEST_CASE("threads of different ordinals allocate in different shards, one shard each") {
  tracking_resource upstream;
  shuffler s({.shards = 4}, &upstream);
  const handle a = alloc_as(s, 0, 10), b = alloc_as(s, 1, 11), c = alloc_as(s, 5, 12), d = alloc_as(s, 4, 13);
  CHECK(tag_of(a) != tag_of(b));
  CHECK(tag_of(b) == tag_of(c));  // ordinals 1 and 5 share shard 1 of 4
  CHECK(tag_of(a) == tag_of(d));
  // Any ordinal reaches every shard's entries.
  const as_ordinal other(2);
  CHECK(value_of(s, a) == 10);
  CHECK(value_of(s, b) == 11);
  CHECK(value_of(s, c) == 12);
  CHECK(value_of(s, d) == 13);
  const shuffler_stats st = s.stats();
  CHECK(st.live_entries == 4);
  CHECK(st.arenas == 2);  // shards 0 and 1; shards 2 and 3 were never allocated in
  CHECK(st.reserved_bytes == upstream.stats().current_bytes);
}

TEST_CASE("with one shard every thread allocates in it") {
  shuffler s({.shards = 1});
  const handle a = alloc_as(s, 0, 1), b = alloc_as(s, 1, 2), c = alloc_as(s, 7, 3);
  CHECK(tag_of(a) == tag_of(b));
  CHECK(tag_of(a) == tag_of(c));
  CHECK(s.stats().arenas == 1);
}

TEST_CASE("a thread whose shard cannot be made for want of a handle tag allocates in shard 0") {
  shuffler s({.shards = 4});
  const handle first = alloc_as(s, 0, 1);
  std::vector<detail::tag_grant> held;  // every tag left, so no shard can be made
  for (;;) {
    try {
      held.push_back(detail::acquire_tag());
    } catch (const error&) {
      break;
    }
  }
  const handle h = alloc_as(s, 1, 2);
  for (const auto& g : held) detail::release_tag(g.tag, g.first_generation);
  CHECK(tag_of(h) == tag_of(first));
  CHECK(value_of(s, h) == 2);
  // With tags free again, the thread's own shard is made.
  const handle later = alloc_as(s, 1, 3);
  CHECK(tag_of(later) != tag_of(first));
  CHECK(value_of(s, later) == 3);
}

TEST_CASE("threads started and ended one after another each take the ordinal of the one before") {
  tracking_resource upstream;
  shuffler s({.shards = 8}, &upstream);
  const as_ordinal main_thread(0);  // set by hand: the threads below take the lowest ones
  handle held = invalid_handle;
  const live_thread holder([&] { held = alloc_here(s, 100); });  // keeps one ordinal taken
  std::vector<handle> hs;
  for (std::uint64_t t = 0; t < 20; ++t) hs.push_back(alloc_in_ended_thread(s, t));
  for (const handle h : hs) CHECK(tag_of(h) == tag_of(hs[0]));
  CHECK(tag_of(hs[0]) != tag_of(held));
  // Two shards made, the holder's and theirs, each with one arena; not eight.
  CHECK(s.stats().arenas == 2);
  CHECK(s.stats().reserved_bytes == upstream.stats().current_bytes);
  for (std::uint64_t t = 0; t < hs.size(); ++t) CHECK(value_of(s, hs[t]) == t);
  CHECK(value_of(s, held) == 100);
}

TEST_CASE("a new thread takes the ordinal of an ended thread, never one a live thread holds") {
  shuffler s({.shards = 8});
  const as_ordinal main_thread(0);
  handle a = invalid_handle, c = invalid_handle;
  const live_thread alive([&] { a = alloc_here(s, 1); });
  const handle b = alloc_in_ended_thread(s, 2);
  REQUIRE(tag_of(b) != tag_of(a));
  const live_thread after([&] { c = alloc_here(s, 3); });
  CHECK(tag_of(c) == tag_of(b));
  CHECK(tag_of(c) != tag_of(a));
}

TEST_CASE("an ordinal set by hand gives back the one the thread took, and is never given back itself") {
  shuffler s({.shards = 8});
  const as_ordinal main_thread(0);
  handle first = invalid_handle, taken = invalid_handle, again = invalid_handle;
  live_thread holder([&] { first = alloc_here(s, 0); });  // takes ordinal 0
  // Takes ordinal 1, then holds 1 by hand: 1 is free for others at once.
  live_thread by_hand([&] {
    taken = alloc_here(s, 1);
    detail::set_thread_ordinal(1);
  });
  REQUIRE(tag_of(taken) != tag_of(first));
  live_thread next([&] { again = alloc_here(s, 2); });
  CHECK(tag_of(again) == tag_of(taken));
  // Its end gives nothing back: ordinal 1 stays with the thread that took it.
  by_hand.end();
  const handle later = alloc_in_ended_thread(s, 3);
  CHECK(tag_of(later) != tag_of(again));
  CHECK(tag_of(later) != tag_of(first));
}

TEST_CASE("a shard count of 0 or above 64 is refused") {
  CHECK_THROWS_AS(shuffler({.shards = 0}), std::invalid_argument);
  CHECK_THROWS_AS(shuffler({.shards = 65}), std::invalid_argument);
  CHECK_NOTHROW(shuffler({.shards = 64}));
}

TEST_CASE("free, size_of, valid, read and write reach the entry's shard from any thread") {
  shuffler s({.shards = 3});
  const handle h = alloc_as(s, 2, 42);
  const as_ordinal o(0);
  CHECK(s.valid(h));
  CHECK(s.size_of(h) == sizeof(std::uint64_t));
  const std::uint64_t v = 7;
  s.write(h, std::as_bytes(std::span(&v, 1)));
  std::uint64_t out = 0;
  s.read(h, std::as_writable_bytes(std::span(&out, 1)));
  CHECK(out == 7);
  s.free(h);
  CHECK_FALSE(s.valid(h));
  CHECK_THROWS_AS(s.size_of(h), invalid_handle_error);
  CHECK(s.stats().pending_free_entries == 1);
}

TEST_CASE("a handle of another shuffler is refused by every shard") {
  shuffler s({.shards = 4}), other({.shards = 4});
  alloc_as(s, 1, 1);
  alloc_as(s, 2, 2);
  const handle foreign = alloc_as(other, 1, 3);
  CHECK_FALSE(s.valid(foreign));
  CHECK_THROWS_AS(s.rent<std::uint64_t>(foreign), invalid_handle_error);
  CHECK_THROWS_AS(s.free(foreign), invalid_handle_error);
  CHECK_THROWS_AS(s.return_pointer(foreign), invalid_handle_error);
  CHECK_THROWS_AS(s.rent<std::uint64_t>(invalid_handle), invalid_handle_error);
  CHECK(value_of(other, foreign) == 3);
}

TEST_CASE("stats, shuffle and rotate_key span every shard") {
  shuffler s({.shards = 4});
  std::vector<handle> hs;
  for (std::size_t o = 0; o < 4; ++o)
    for (std::uint64_t i = 0; i < 3; ++i) hs.push_back(alloc_as(s, o, o * 100 + i));
  s.free(hs[0]);
  s.free(hs[4]);
  CHECK(s.stats().live_entries == 10);
  CHECK(s.stats().pending_free_entries == 2);
  s.shuffle();
  CHECK(s.stats().shuffles == 4);
  CHECK(s.stats().pending_free_entries == 0);
  const key_type key{std::byte{1}, std::byte{2}};
  const salt_type salt{std::byte{3}};
  s.rotate_key(key, salt);
  s.rotate_key();
  CHECK(s.stats().key_rotations == 8);
  // Entries of shards made later are under keys derived from the given one, or random.
  const handle late = alloc_as(s, 3, 999);
  for (std::size_t i = 0; i < hs.size(); ++i)
    if (i != 0 && i != 4) CHECK(value_of(s, hs[i]) == (i / 3) * 100 + i % 3);
  CHECK(value_of(s, late) == 999);
}

TEST_CASE("shuffle steps visit each shard's pass in turn") {
  shuffler s({.shards = 2});
  std::vector<handle> hs;
  for (std::size_t o = 0; o < 2; ++o)
    for (std::uint64_t i = 0; i < 64; ++i) hs.push_back(alloc_as(s, o, i));
  for (std::size_t i = 0; i < hs.size(); i += 2) s.free(hs[i]);
  REQUIRE(s.stats().pending_free_entries == 64);
  // Small steps: the passes of both shards end, one after the other.
  for (int step = 0; step < 10'000 && s.stats().pending_free_entries != 0; ++step) s.shuffle(64);
  CHECK(s.stats().pending_free_entries == 0);  // dropped in both shards' passes
  for (std::size_t i = 1; i < hs.size(); i += 2) CHECK(value_of(s, hs[i]) == i % 64);
}

TEST_CASE("set_shuffle_on_return reaches shards made before and after it") {
  shuffler s({.shards = 2});
  const handle a = alloc_as(s, 0, 1);
  s.set_shuffle_on_return(true);
  const handle b = alloc_as(s, 1, 2);  // its shard made now
  (void)value_of(s, a);
  (void)value_of(s, b);
  CHECK(s.stats().entries_relocated_on_return >= 2);
}

TEST_CASE("a shard's key is AES-256 under the given key of counter blocks no entry uses") {
  key_type key{};
  for (std::size_t i = 0; i < key.size(); ++i) key[i] = static_cast<std::byte>(i * 7 + 1);
  const salt_type salt{std::byte{0xA0}, std::byte{0xA1}, std::byte{0xA2}, std::byte{0xA3},
                       std::byte{0xA4}, std::byte{0xA5}, std::byte{0xA6}, std::byte{0xA7}};
  key_type k3{};
  salt_type s3{};
  detail::derive_shard_key(key, salt, 3, k3, s3);
  // The same blocks through Crypto++'s AES directly.
  CryptoPP::AES::Encryption aes(reinterpret_cast<const CryptoPP::byte*>(key.data()), key.size());
  std::array<std::byte, 48> expected{};
  for (std::uint8_t j = 0; j < 3; ++j) {
    std::array<std::byte, 16> block{};
    std::memcpy(block.data(), salt.data(), 8);
    for (int i = 8; i < 12; ++i) block[i] = std::byte{0xFF};
    block[13] = std::byte{3};
    block[15] = std::byte{j};
    aes.ProcessBlock(reinterpret_cast<const CryptoPP::byte*>(block.data()),
                     reinterpret_cast<CryptoPP::byte*>(expected.data() + 16 * j));
  }
  CHECK(std::memcmp(k3.data(), expected.data(), 32) == 0);
  CHECK(std::memcmp(s3.data(), expected.data() + 32, 8) == 0);
  key_type k4{};
  salt_type s4{};
  detail::derive_shard_key(key, salt, 4, k4, s4);
  CHECK(k4 != k3);
  CHECK(k3 != key);
}

TEST_CASE("in a child of fork every shard refuses") {
  shuffler s({.shards = 2});
  const handle a = alloc_as(s, 0, 1), b = alloc_as(s, 1, 2);
  const int status = testing::run_in_child([&] {
    int refused = 0;
    for (const handle h : {a, b}) {
      try {
        (void)s.rent<std::uint64_t>(h);
      } catch (const fork_error&) {
        ++refused;
      }
    }
    try {
      (void)alloc_as(s, 1, 3);
    } catch (const fork_error&) {
      ++refused;
    }
    return refused == 3 && !s.valid(a) && !s.valid(b);
  });
  CHECK(status == 0);
  CHECK(value_of(s, b) == 2);
}

}  // TEST_SUITE

TEST_SUITE("concurrency") {

TEST_CASE("threads in shards of their own keep their entries apart over an upstream that is not thread safe") {
  tracking_resource upstream(tracking_options{.thread_safe = false});
  {
    shuffler s({.arena_size = 4096, .shards = 4}, &upstream);
    std::vector<std::thread> threads;
    std::atomic<int> wrong{0};
    for (std::size_t t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        detail::set_thread_ordinal(t);
        std::vector<handle> mine;
        for (std::uint64_t i = 0; i < 2000; ++i) {
          mine.push_back(s.create<std::uint64_t>());
          *s.rent<std::uint64_t>(mine.back()) = t * 1'000'000 + i;
          if (i % 3 == 0) {
            s.free(mine[i / 2]);
            mine[i / 2] = invalid_handle;
          }
          if (i % 500 == 0) s.shuffle(4096);
        }
        for (std::uint64_t i = 0; i < mine.size(); ++i)
          if (mine[i] != invalid_handle && *s.rent<const std::uint64_t>(mine[i]) != t * 1'000'000 + i) ++wrong;
      });
    }
    for (auto& th : threads) th.join();
    CHECK(wrong == 0);
    s.shuffle();
    CHECK(s.stats().reserved_bytes == upstream.stats().current_bytes);
  }
  CHECK_FALSE(upstream.has_leaks());
}

TEST_CASE("threads alive at once never share an ordinal, and the next ones take the same ordinals back") {
  shuffler s({.shards = 64});
  const as_ordinal main_thread(0);
  constexpr std::size_t n = 16;
  // n threads that each allocate, then wait until all have, so all hold theirs at once.
  const auto tags_of_a_wave = [&] {
    std::array<handle, n> hs{};
    std::latch all_allocated(n);
    std::vector<std::thread> threads;
    for (std::size_t t = 0; t < n; ++t)
      threads.emplace_back([&, t] {
        hs[t] = alloc_here(s, t);
        all_allocated.arrive_and_wait();
      });
    for (auto& th : threads) th.join();
    std::set<std::uint16_t> tags;
    for (const handle h : hs) tags.insert(tag_of(h));
    return tags;
  };
  const std::set<std::uint16_t> first = tags_of_a_wave();
  CHECK(first.size() == n);
  CHECK(tags_of_a_wave() == first);
}

}  // TEST_SUITE
