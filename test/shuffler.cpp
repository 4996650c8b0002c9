// The shuffler through its public API: values against a reference model, moves and
// alignment, leases and pins, policies, errors that change nothing, memory given back,
// the seed library's faults, and threads.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iostream>
#include <map>
#include <optional>
#include <memory>
#include <set>
#include <span>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <memshuffle/shuffler.hpp>
#include <memshuffle/tracking_resource.hpp>

#include "test/support/child_process.hpp"
#include "test/support/cipher_kinds.hpp"
#include "test/support/random_bytes.hpp"
#include "test/support/recording_resource.hpp"
#include "test/support/seed.hpp"
#include "lib/huge_page_resource.hpp"

#include <memshuffle/detail/sanitizers.hpp>
#ifdef MEMSHUFFLE_ASAN
#include <sanitizer/asan_interface.h>
#endif

using namespace memshuffle;
using memshuffle::testing::all_ciphers;
using memshuffle::testing::encrypting_ciphers;
using memshuffle::testing::random_bytes;
using memshuffle::testing::recording_resource;

namespace {

struct alignas(16) u128 {
  std::uint64_t lo, hi;
};
struct alignas(4096) page {
  std::uint64_t words[8];
};

bool aligned(const void* p, std::size_t a) { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

std::vector<std::byte> read_all(shuffler& s, handle h) {
  std::vector<std::byte> v(s.size_of(h));
  s.read(h, v);
  return v;
}

// What the shuffler should hold: every live entry's bytes and alignment.
struct model {
  struct item {
    std::vector<std::byte> bytes;
    std::size_t alignment;
  };
  std::map<handle, item> entries;

  std::size_t live_bytes() const {
    std::size_t n = 0;
    for (auto& [h, e] : entries) n += e.bytes.size();
    return n;
  }
  handle pick(std::mt19937_64& rng) const {
    auto it = entries.begin();
    std::advance(it, static_cast<long>(rng() % entries.size()));
    return it->first;
  }
};

// Every value, size and the live statistics agree with the model.
void check_model(shuffler& s, const model& m) {
  for (auto& [h, e] : m.entries) {
    REQUIRE(s.valid(h));
    REQUIRE(s.size_of(h) == e.bytes.size());
    REQUIRE(read_all(s, h) == e.bytes);
  }
  const auto st = s.stats();
  REQUIRE(st.live_entries == m.entries.size());
  REQUIRE(st.live_bytes == m.live_bytes());
  REQUIRE(st.pinned_entries == 0);
}

// What a failed call must leave as it was.
struct snapshot {
  std::size_t live_entries, live_bytes, reserved_bytes, arenas, pinned, pending;
  bool operator==(const snapshot&) const = default;
};
snapshot snap(const shuffler& s) {
  const auto st = s.stats();
  return {st.live_entries, st.live_bytes, st.reserved_bytes, st.arenas, st.pinned_entries,
          st.pending_free_entries};
}

// A handle with a random type and size, recorded in the model as zeros.
handle alloc_random(shuffler& s, model& m, std::mt19937_64& rng) {
  handle h{};
  std::size_t alignment = 1;
  switch (rng() % 6) {
    case 0: h = s.alloc<std::byte>(1 + rng() % 300); break;
    case 1: h = s.alloc<std::uint64_t>(1 + rng() % 40), alignment = alignof(std::uint64_t); break;
    case 2: h = s.alloc<double>(1 + rng() % 20), alignment = alignof(double); break;
    case 3: h = s.create<u128>(), alignment = alignof(u128); break;
    case 4: h = (rng() % 8 == 0 ? s.create<page>() : s.create<std::uint32_t>());
            alignment = s.size_of(h) == sizeof(page) ? alignof(page) : alignof(std::uint32_t); break;
    default: h = s.alloc<char>(1 + rng() % 5000); break;
  }
  m.entries[h] = {std::vector<std::byte>(s.size_of(h)), alignment};
  return h;
}

// The randomized mix of the seed library's own test list, checked after every step.
void run_model(shuffler_options options, std::uint64_t seed, int steps) {
  CAPTURE(seed);
  recording_resource up, plain;
  if (options.plaintext_resource != nullptr) options.plaintext_resource = &plain;
  {
    shuffler s(options, &up);
    model m;
    std::vector<handle> gone;
    std::mt19937_64 rng(seed);
    for (int step = 0; step < steps; ++step) {
      CAPTURE(step);
      const unsigned op = static_cast<unsigned>(rng() % 100);
      CAPTURE(op);
      if (m.entries.size() < 4 || (op < 22 && m.entries.size() < 60)) {
        alloc_random(s, m, rng);
      } else if (op < 34) {
        const handle h = m.pick(rng);
        s.free(h);
        m.entries.erase(h);
        gone.push_back(h);
      } else if (op < 56) {  // rent, check alignment, mutate through the lease
        const handle h = m.pick(rng);
        auto& e = m.entries[h];
        auto l = s.rent<std::byte>(h);
        REQUIRE(aligned(l.get(), e.alignment));
        REQUIRE(l.size() == e.bytes.size());
        REQUIRE(std::equal(l.span().begin(), l.span().end(), e.bytes.begin()));
        for (int k = 0; k < 4; ++k) {
          const std::size_t at = rng() % e.bytes.size();
          e.bytes[at] = l.span()[at] = static_cast<std::byte>(rng());
        }
      } else if (op < 62) {  // nested leases: the inner one ends first, the entry stays put
        const handle h = m.pick(rng);
        auto outer = s.rent<std::byte>(h);
        std::byte* p = outer.get();
        {
          auto inner = s.rent<std::byte>(h);
          REQUIRE(inner.get() == p);
          inner.span()[0] = m.entries[h].bytes[0] = static_cast<std::byte>(rng());
        }
        s.shuffle();
        REQUIRE(outer.get()[0] == m.entries[h].bytes[0]);
        REQUIRE(s.stats().pinned_entries == 1);
      } else if (op < 70) {  // write a prefix
        const handle h = m.pick(rng);
        auto& e = m.entries[h];
        const auto in = random_bytes(rng, 1 + rng() % e.bytes.size());
        s.write(h, in);
        std::copy(in.begin(), in.end(), e.bytes.begin());
      } else if (op < 80) {
        s.shuffle();
      } else if (op < 92) {
        s.shuffle(1 + rng() % 4000);
      } else if (op < 94) {
        s.rotate_key();
      } else if (!gone.empty()) {  // a freed handle stays invalid
        const handle h = gone[rng() % gone.size()];
        REQUIRE_FALSE(s.valid(h));
        REQUIRE_THROWS_AS(s.rent<std::byte>(h), invalid_handle_error);
        REQUIRE_THROWS_AS(s.free(h), invalid_handle_error);
      }
      check_model(s, m);
    }
  }
  REQUIRE(up.outstanding() == 0);
  REQUIRE(up.mismatches() == 0);
  REQUIRE(plain.outstanding() == 0);
  REQUIRE(plain.mismatches() == 0);
}

}  // namespace

TEST_SUITE("shuffler") {

TEST_CASE("a random mix of alloc, create, free, rent, mutate, write and shuffle matches a model") {
  MEMSHUFFLE_TEST_SEED(seed);
  for (cipher_kind c : all_ciphers) {
    for (int variant = 0; variant < 4; ++variant) {
      CAPTURE(static_cast<int>(c));
      CAPTURE(variant);
      shuffler_options o{.cipher = c,
                         .shuffle_on_return = (variant & 1) != 0,
                         .arena_size = 16 * 1024};
      if ((variant & 2) != 0) o.plaintext_resource = std::pmr::new_delete_resource();  // replaced in run_model
      else o.plaintext_in_place = true;
      run_model(o, seed + static_cast<std::uint64_t>(variant), 700);
    }
  }
}

TEST_CASE("fresh entries read as zeros under every cipher, in place and in a window") {
  recording_resource plain;
  for (cipher_kind c : all_ciphers) {
    for (auto* window : {static_cast<std::pmr::memory_resource*>(nullptr), static_cast<std::pmr::memory_resource*>(&plain)}) {
      CAPTURE(static_cast<int>(c));
      // A dirty upstream: the shuffler must not show what was in the memory before.
      tracking_resource dirty(tracking_options{.fill_on_allocate = std::byte{0xAB}});
      shuffler s({.cipher = c, .plaintext_resource = window, .plaintext_in_place = window == nullptr}, &dirty);
      const handle h = s.alloc<std::uint64_t>(100);
      auto l = s.rent<std::uint64_t>(h);
      CHECK(std::all_of(l.span().begin(), l.span().end(), [](std::uint64_t v) { return v == 0; }));
    }
  }
}

TEST_CASE("a long-lived entry keeps its value across thousands of shuffles and churn") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  shuffler s({.arena_size = 8 * 1024});
  const handle keeper = s.create<std::array<std::uint64_t, 4>>();
  const std::array<std::uint64_t, 4> value{0x0123456789ABCDEF, 42, ~0ull, 7};
  *s.rent<std::array<std::uint64_t, 4>>(keeper) = value;
  std::vector<handle> churn;
  for (int round = 0; round < 3000; ++round) {
    churn.push_back(s.alloc<std::byte>(1 + rng() % 200));
    if (churn.size() > 50) {
      const std::size_t i = rng() % churn.size();
      s.free(churn[i]);
      churn.erase(churn.begin() + static_cast<long>(i));
    }
    if (round % 3 == 0) s.shuffle();
    else s.shuffle(1 + rng() % 2048);
    if (round % 100 == 0) REQUIRE(*s.rent<std::array<std::uint64_t, 4>>(keeper) == value);
  }
  CHECK(*s.rent<std::array<std::uint64_t, 4>>(keeper) == value);
  CHECK(s.stats().shuffles >= 1000);
}

TEST_CASE("u64, double, 128-bit and 4096-aligned entries stay aligned after every kind of move") {
  shuffler s({.cipher = cipher_kind::aes_256_gcm, .arena_size = 16 * 1024});
  std::vector<std::pair<handle, std::size_t>> hs;
  for (int i = 0; i < 8; ++i) {
    hs.emplace_back(s.alloc<std::uint64_t>(3), alignof(std::uint64_t));
    hs.emplace_back(s.alloc<double>(5), alignof(double));
    hs.emplace_back(s.create<u128>(), alignof(u128));
    hs.emplace_back(s.create<page>(), alignof(page));
    hs.emplace_back(s.alloc<std::byte>(13), 1);  // odd sizes between them
  }
  const auto check_all = [&] {
    for (const auto& entry : hs) {
      auto l = s.rent<std::byte>(entry.first);
      const std::size_t alignment = entry.second;
      CAPTURE(alignment);
      CHECK(aligned(l.get(), alignment));
    }
  };
  for (int round = 0; round < 20; ++round) {
    s.shuffle();
    check_all();
    s.shuffle(3000);
    check_all();
    s.set_shuffle_on_return(round % 2 == 0);  // each rent in check_all moves on return
    check_all();
  }
  // The values survive too.
  *s.rent<page>(hs[3].first) = page{{1, 2, 3, 4, 5, 6, 7, 8}};
  s.shuffle();
  CHECK(s.rent<page>(hs[3].first)->words[7] == 8);
}

TEST_CASE("a rented entry keeps its address across shuffles until it is returned") {
  recording_resource up;
  shuffler s({.arena_size = 4096}, &up);
  std::vector<handle> others;
  for (int i = 0; i < 200; ++i) others.push_back(s.alloc<std::uint64_t>(4));
  const handle h = s.alloc<std::uint64_t>(4);
  auto l = s.rent<std::uint64_t>(h);
  l.span()[2] = 99;
  std::uint64_t* p = l.get();
  for (int i = 0; i < 50; ++i) {
    s.shuffle();
    s.shuffle(512);
    CHECK(l.get() == p);
    CHECK(p[2] == 99);
  }
  CHECK(s.stats().bytes_moved > 0);  // the others did move
  l.reset();
  CHECK(s.rent<std::uint64_t>(h).span()[2] == 99);
}

TEST_CASE("shuffle on return moves the returned entry alone to a new address") {
  shuffler s({.cipher = cipher_kind::none, .shuffle_on_return = true, .plaintext_in_place = true});
  const handle h = s.alloc<std::uint64_t>(8);
  const handle other = s.alloc<std::uint64_t>(8);
  int changed = 0;
  std::uint64_t* last = nullptr;
  for (std::uint64_t i = 0; i < 100; ++i) {
    const auto moved_before = s.stats().bytes_moved;
    {
      auto l = s.rent<std::uint64_t>(h);
      if (l.get() != last) ++changed;
      last = l.get();
      l.span()[i % 8] = i;
    }
    CHECK(s.stats().bytes_moved - moved_before == 8 * sizeof(std::uint64_t));  // that entry only
  }
  CHECK(changed == 100);
  CHECK(s.stats().entries_relocated_on_return == 100);
  CHECK(s.stats().shuffles == 0);  // never a whole-heap compaction
  CHECK(s.rent<std::uint64_t>(h).span()[7] == 95);
  CHECK(s.rent<std::uint64_t>(other).span()[0] == 0);
}

TEST_CASE("when a move on return finds no memory the entry stays where it is") {
  recording_resource up;
  shuffler s({.shuffle_on_return = true, .arena_size = 1024}, &up);
  const handle h = s.alloc<std::byte>(1000);  // fills the arena: the move needs a new one
  std::byte* before = s.rent_pointer<std::byte*>(h);
  before[0] = std::byte{5};
  up.fail_after(0, false);
  s.return_pointer(h);
  std::byte* after = s.rent_pointer<std::byte*>(h);
  up.fail_never();
  CHECK(after == before);
  CHECK(after[0] == std::byte{5});
  s.return_pointer(h);
}

TEST_CASE("nested leases count: the entry stays pinned until the last one ends") {
  shuffler s;
  const handle h = s.create<std::uint64_t>();
  auto a = s.rent<std::uint64_t>(h);
  auto b = s.rent<std::uint64_t>(h);
  std::uint64_t* c = s.rent_pointer<std::uint64_t*>(h);
  CHECK(a.get() == b.get());
  CHECK(c == a.get());
  *a = 11;
  b.reset();  // the seed library's flag would have unlocked the entry here
  CHECK(s.stats().pinned_entries == 1);
  CHECK_THROWS_AS(s.free(h), lease_error);
  s.shuffle();
  CHECK(a.get() == c);
  s.return_pointer(h);
  CHECK(*a == 11);
  lease<std::uint64_t> moved = std::move(a);
  CHECK_FALSE(a);
  CHECK(s.stats().pinned_entries == 1);
  moved.reset();
  CHECK(s.stats().pinned_entries == 0);
  CHECK_THROWS_AS(s.return_pointer(h), lease_error);
  CHECK(*s.rent<std::uint64_t>(h) == 11);
  s.free(h);
}

TEST_CASE("the rented type is checked against the entry's size and alignment") {
  shuffler s;
  const handle small = s.alloc<std::uint32_t>(1);
  const handle bytes = s.alloc<std::byte>(64);
  CHECK_THROWS_AS(s.rent<std::uint64_t>(small), type_error);  // 8 > 4 bytes
  CHECK_THROWS_AS(s.rent<u128>(bytes), type_error);           // aligned to 1, not 16
  CHECK_THROWS_AS(s.rent<double>(bytes), type_error);
  CHECK_THROWS_AS(s.rent_pointer<std::uint64_t*>(small), type_error);
  CHECK(s.stats().pinned_entries == 0);  // no failed rent pinned anything
  CHECK(s.rent<std::uint16_t>(small).size() == 2);  // smaller and less aligned is fine
  CHECK(s.rent<char>(bytes).size() == 64);
}

TEST_CASE("encryptions and decryptions are counted exactly and never-written entries are not decrypted") {
  for (cipher_kind c : encrypting_ciphers) {
    CAPTURE(static_cast<int>(c));
    shuffler s({.cipher = c});
    const handle h = s.alloc<std::uint64_t>(4);
    CHECK(s.stats().encryptions == 0);
    s.rent<std::uint64_t>(h).span()[1] = 3;  // fresh: zeroed, not decrypted
    CHECK(s.stats().decryptions == 0);
    CHECK(s.stats().encryptions == 1);
    {
      auto a = s.rent<std::uint64_t>(h);
      auto b = s.rent<std::uint64_t>(h);  // nested: no second decryption
      CHECK(a.span()[1] == 3);
    }
    CHECK(s.stats().decryptions == 1);
    CHECK(s.stats().encryptions == 2);
    s.shuffle();  // moves copy ciphertext as it is
    CHECK(s.stats().encryptions == 2);
    s.rotate_key();  // one re-encryption for the one entry
    CHECK(s.stats().decryptions == 2);
    CHECK(s.stats().encryptions == 3);
    CHECK(s.stats().key_rotations == 1);
    CHECK(s.rent<std::uint64_t>(h).span()[1] == 3);
  }
}

TEST_CASE("rotate_key_every rotates to a fresh key after that many encryptions, data intact") {
  shuffler s({.cipher = cipher_kind::aes_256_gcm, .rotate_key_every = 5});
  std::vector<handle> hs;
  for (std::uint64_t i = 0; i < 4; ++i) {
    hs.push_back(s.create<std::uint64_t>());
    *s.rent<std::uint64_t>(hs.back()) = i;
  }
  CHECK(s.stats().key_rotations == 0);
  *s.rent<std::uint64_t>(hs[0]) = 10;  // the fifth encryption
  CHECK(s.stats().key_rotations == 1);
  for (std::uint64_t i = 1; i < 4; ++i) CHECK(*s.rent<std::uint64_t>(hs[i]) == i);
  CHECK(*s.rent<std::uint64_t>(hs[0]) == 10);
}

TEST_CASE("key rotation with leases open re-encrypts the rented entries when they return") {
  for (cipher_kind c : encrypting_ciphers) {
    CAPTURE(static_cast<int>(c));
    shuffler s({.cipher = c});
    const handle a = s.create<std::uint64_t>();
    const handle b = s.create<std::uint64_t>();
    *s.rent<std::uint64_t>(a) = 1;
    *s.rent<std::uint64_t>(b) = 2;
    auto held = s.rent<std::uint64_t>(a);
    const auto enc = s.stats().encryptions;
    s.rotate_key(key_type{std::byte{1}}, salt_type{std::byte{2}});
    CHECK(s.stats().encryptions == enc + 1);  // b only
    *held = 5;
    held.reset();
    CHECK(s.stats().encryptions == enc + 2);
    s.rotate_key();
    CHECK(*s.rent<std::uint64_t>(a) == 5);
    CHECK(*s.rent<std::uint64_t>(b) == 2);
  }
}

TEST_CASE("a lease spans size_of(h) / sizeof(T) elements") {
  shuffler s;
  const handle h = s.alloc<std::byte>(20);
  CHECK(s.rent<std::uint8_t>(h).size() == 20);
  CHECK(s.rent<std::array<char, 6>>(h).size() == 3);
  const handle w = s.alloc<std::uint64_t>(5);
  CHECK(s.rent<std::uint32_t>(w).size() == 10);
  CHECK(s.rent<u128>(s.alloc<u128>(2)).span().size() == 2);
}

TEST_CASE("a freed handle is invalid at once, before any shuffle") {
  shuffler s;
  const handle h = s.create<int>();
  s.free(h);
  CHECK_FALSE(s.valid(h));
  CHECK_THROWS_AS(s.rent<int>(h), invalid_handle_error);
  CHECK_THROWS_AS(s.size_of(h), invalid_handle_error);
  CHECK_THROWS_AS(s.free(h), invalid_handle_error);
  CHECK(s.stats().pending_free_entries == 1);
  const handle again = s.create<int>();  // may reuse the slot; the old handle stays dead
  s.shuffle();
  CHECK(s.stats().pending_free_entries == 0);
  CHECK_FALSE(s.valid(h));
  CHECK(s.valid(again));
}

TEST_CASE("every bad call raises its error and leaves the shuffler unchanged") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  for (cipher_kind c : all_ciphers) {
    CAPTURE(static_cast<int>(c));
    recording_resource up;
    shuffler s({.cipher = c}, &up);
    shuffler other({.cipher = c}, &up);
    model m;
    for (int i = 0; i < 20; ++i) {
      const handle h = alloc_random(s, m, rng);
      m.entries[h].bytes = random_bytes(rng, m.entries[h].bytes.size());
      s.write(h, m.entries[h].bytes);
    }
    const handle bytes_entry = s.alloc<std::byte>(7);
    m.entries[bytes_entry] = {std::vector<std::byte>(7), 1};
    const handle freed = s.create<int>();
    s.free(freed);
    const handle foreign = other.create<int>();
    handle rented = m.pick(rng);
    while (rented == bytes_entry) rented = m.pick(rng);
    auto held = s.rent<std::byte>(rented);
    const snapshot before = snap(s);
    const auto unchanged = [&] {
      CHECK(snap(s) == before);
      held.reset();
      check_model(s, m);
      held = s.rent<std::byte>(rented);
    };
    std::byte buffer[8]{};
    for (handle bad : {invalid_handle, freed, foreign, handle{0}, static_cast<handle>(rng())}) {
      CAPTURE(static_cast<std::uint64_t>(bad));
      CHECK_FALSE(s.valid(bad));
      CHECK_THROWS_AS(s.rent<int>(bad), invalid_handle_error);
      CHECK_THROWS_AS(s.rent_pointer<int*>(bad), invalid_handle_error);
      CHECK_THROWS_AS(s.return_pointer(bad), invalid_handle_error);
      CHECK_THROWS_AS(s.free(bad), invalid_handle_error);
      CHECK_THROWS_AS(s.size_of(bad), invalid_handle_error);
      CHECK_THROWS_AS(s.read(bad, buffer), invalid_handle_error);
      CHECK_THROWS_AS(s.write(bad, buffer), invalid_handle_error);
      unchanged();
    }
    CHECK_THROWS_AS(s.free(rented), lease_error);
    unchanged();
    CHECK_THROWS_AS(s.return_pointer(bytes_entry), lease_error);
    unchanged();
    using eight_bytes = std::array<std::byte, 8>;
    CHECK_THROWS_AS(s.rent<eight_bytes>(bytes_entry), type_error);  // larger
    CHECK_THROWS_AS(s.rent<std::uint32_t>(bytes_entry), type_error);              // misaligned
    CHECK_THROWS_AS(s.rent_pointer<double*>(bytes_entry), type_error);
    CHECK_THROWS_AS(s.read(bytes_entry, buffer), type_error);  // 8 bytes out of 7
    CHECK_THROWS_AS(s.write(bytes_entry, buffer), type_error);
    unchanged();
    CHECK_THROWS_AS(s.alloc<int>(0), type_error);
    CHECK_THROWS_AS(s.alloc<std::uint64_t>(~std::size_t{0} / 4), type_error);  // size overflows
    unchanged();
    up.fail_after(0, false);
    CHECK_THROWS_AS(s.alloc<std::byte>(100000), std::bad_alloc);  // needs a new arena
    up.fail_never();
    unchanged();
  }
}

TEST_CASE("an entry too large for one GCM seal is refused at alloc, before any memory is asked for") {
  constexpr std::size_t gcm_limit = (std::size_t{1} << 36) - 32;  // 2^32 - 2 blocks of 16 bytes
  for (cipher_kind c : all_ciphers) {
    CAPTURE(static_cast<int>(c));
    const bool gcm = c == cipher_kind::aes_256_gcm;
    recording_resource up;
    shuffler s({.cipher = c}, &up);
    const handle kept = s.create<int>();
    const snapshot before = snap(s);
    // Every upstream request fails from here: a size that passed the checks shows up as
    // std::bad_alloc and a counted failure, a refused one as type_error with none.
    up.fail_after(0, false);
    const auto attempt = [&](auto alloc) {
      const std::size_t failures = up.failures_injected();
      try {
        alloc();
      } catch (const type_error&) {
        CHECK(up.failures_injected() == failures);
        return 'T';
      } catch (const std::bad_alloc&) {
        CHECK(up.failures_injected() > failures);
        return 'M';
      }
      return '-';
    };
    CHECK(attempt([&] { s.alloc<std::byte>(gcm_limit + 1); }) == (gcm ? 'T' : 'M'));
    CHECK(attempt([&] { s.alloc<std::uint64_t>(gcm_limit / 8 + 1); }) == (gcm ? 'T' : 'M'));
    CHECK(attempt([&] { s.alloc<std::byte>(gcm_limit); }) == 'M');  // the largest GCM can seal
    CHECK(attempt([&] { s.alloc<std::byte>(std::size_t{1} << 40); }) == 'T');  // past the table's 40 bits
    CHECK(attempt([&] { s.alloc<std::byte>(~std::size_t{0}); }) == 'T');  // size + tag would wrap
    up.fail_never();
    CHECK(snap(s) == before);
    CHECK(s.valid(kept));
  }
}

namespace {
// The entries' addresses, by handle, read through rent_pointer (cipher none: returning
// moves nothing).
std::vector<std::uintptr_t> addresses(shuffler& s, const std::vector<handle>& hs) {
  std::vector<std::uintptr_t> out;
  for (handle h : hs) {
    out.push_back(reinterpret_cast<std::uintptr_t>(s.rent_pointer<std::byte*>(h)));
    s.return_pointer(h);
  }
  return out;
}

// Each entry's rank in address order.
std::vector<double> ranks(const std::vector<std::uintptr_t>& at) {
  std::vector<std::size_t> idx(at.size());
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  std::sort(idx.begin(), idx.end(), [&](std::size_t x, std::size_t y) { return at[x] < at[y]; });
  std::vector<double> r(at.size());
  for (std::size_t k = 0; k < idx.size(); ++k) r[idx[k]] = static_cast<double>(k);
  return r;
}

// Spearman's rank correlation: 1 when the orders agree, about 0 for unrelated ones.
double rank_correlation(const std::vector<double>& x, const std::vector<double>& y) {
  const double n = static_cast<double>(x.size());
  double d2 = 0;
  for (std::size_t i = 0; i < x.size(); ++i) d2 += (x[i] - y[i]) * (x[i] - y[i]);
  return 1 - 6 * d2 / (n * (n * n - 1));
}

// The share of entries that keep their successor (in the order of `before`) right
// after them in address order: 1 for an order kept, about 0 for a random one.
double neighbours_kept(const std::vector<double>& before, const std::vector<double>& after) {
  std::vector<std::size_t> by_before(before.size());
  for (std::size_t i = 0; i < before.size(); ++i) by_before[static_cast<std::size_t>(before[i])] = i;
  std::size_t kept = 0;
  for (std::size_t k = 0; k + 1 < by_before.size(); ++k)
    kept += after[by_before[k + 1]] == after[by_before[k]] + 1;
  return static_cast<double>(kept) / static_cast<double>(before.size() - 1);
}
}  // namespace

TEST_CASE("with randomize_layout every shuffle lays the entries out in a fresh random order") {
  constexpr std::size_t count = 20000;  // 16 bytes each on average: about 80 arenas of 4 KiB, one window each
  for (bool randomize : {true, false}) {
    for (int run = 0; run < 3; ++run) {  // each shuffler draws its own layout seed
      CAPTURE(randomize);
      CAPTURE(run);
      shuffler s({.cipher = cipher_kind::none, .randomize_layout = randomize, .arena_size = 4 * 1024,
                  .plaintext_in_place = true});
      std::vector<handle> hs;
      for (std::size_t i = 0; i < count; ++i) hs.push_back(s.alloc<std::uint64_t>(1 + i % 3));
      std::vector<double> allocation(count);
      for (std::size_t i = 0; i < count; ++i) allocation[i] = static_cast<double>(i);
      std::vector<double> previous = ranks(addresses(s, hs));
      // Allocation fills each arena in order (the arenas themselves lie wherever the
      // upstream put them), so the measure below sees that order.
      REQUIRE(neighbours_kept(allocation, previous) > 0.9);
      for (int round = 0; round < 3; ++round) {
        CAPTURE(round);
        s.shuffle();
        const std::vector<double> now = ranks(addresses(s, hs));
        const double from_allocation = rank_correlation(now, allocation);
        const double from_previous = rank_correlation(now, previous);
        const double neighbours = neighbours_kept(previous, now);
        CAPTURE(from_allocation);
        CAPTURE(from_previous);
        CAPTURE(neighbours);
        if (randomize) {
          // Windows (an arena's entries each) in random order, and entries in random
          // order within each: no trace of either order, near or far
          // (|rho| > 0.5 has odds of about 1e-5 for 80 windows placed at random).
          CHECK(std::abs(from_allocation) < 0.5);
          CHECK(std::abs(from_previous) < 0.5);
          CHECK(neighbours < 0.05);
        } else {
          CHECK(neighbours_kept(allocation, now) > 0.9);
          CHECK(neighbours > 0.9);
        }
        previous = now;
      }
    }
  }
}

TEST_CASE("a full shuffle reuses the arenas it empties: the upstream lends a few arenas beyond the heap") {
  const std::size_t arena = 4096, count = 4096;  // 64 arenas of 64-byte entries
  for (cipher_kind c : all_ciphers) {
    for (bool randomize : {true, false}) {
      CAPTURE(static_cast<int>(c));
      CAPTURE(randomize);
      tracking_resource track;
      shuffler s({.cipher = c, .randomize_layout = randomize, .arena_size = arena}, &track);
      std::vector<handle> hs;
      for (std::uint64_t i = 0; i < count; ++i) {
        hs.push_back(s.alloc<std::uint64_t>(8));
        s.write(hs.back(), std::as_bytes(std::span(&i, 1)));
      }
      for (std::size_t i = 0; i < count; i += 7) s.free(hs[i]);  // dropped by the first shuffle
      const std::size_t held = track.stats().current_bytes;
      REQUIRE(track.stats().peak_bytes == held);  // nothing was given back so far
      for (int round = 0; round < 5; ++round) {
        s.shuffle();
        CAPTURE(round);
        // Holding the old and the new copy of the heap at once would be about 2 x held.
        CHECK(track.stats().peak_bytes <= held + 2 * (arena + 64));
        CHECK(s.stats().reserved_bytes == track.stats().current_bytes);
      }
      for (std::uint64_t i = 0; i < count; ++i) {
        if (i % 7 == 0) continue;
        std::uint64_t v = 0;
        s.read(hs[i], std::as_writable_bytes(std::span(&v, 1)));
        CHECK(v == i);
      }
    }
  }
}

TEST_CASE("entries pinned across the heap during a full shuffle keep the upstream's peak within two arenas") {
  for (const std::size_t bytes : {std::size_t{64}, std::size_t{4096}}) {
    for (const bool randomize : {true, false}) {
      CAPTURE(bytes);
      CAPTURE(randomize);
      const std::size_t arena = 16 * bytes, count = 40 * 16;  // 40 arenas of 16 entries
      tracking_resource track;
      shuffler s({.cipher = cipher_kind::aes_256_ctr, .randomize_layout = randomize, .arena_size = arena}, &track);
      std::vector<handle> hs;
      std::vector<std::byte> data(bytes);
      for (std::size_t i = 0; i < count; ++i) {
        std::memset(data.data(), static_cast<int>(i % 251), bytes);
        hs.push_back(s.alloc<std::byte>(bytes));
        s.write(hs.back(), data);
      }
      const std::size_t held = track.stats().current_bytes, one_arena = held / s.stats().arenas;
      REQUIRE(track.stats().peak_bytes == held);  // nothing was given back so far
      // An entry near the front of every fourth arena, pinned through the shuffle.
      std::vector<lease<std::byte>> pins;
      for (std::size_t i = 1; i < count; i += 4 * 16) pins.push_back(s.rent<std::byte>(hs[i]));
      std::vector<const std::byte*> pinned_at;
      for (const auto& l : pins) pinned_at.push_back(l.get());
      s.shuffle();
      // An arena kept whole for each pinned entry would cost ten more.
      CHECK(track.stats().peak_bytes <= held + 2 * one_arena);
      CHECK(s.stats().reserved_bytes == track.stats().current_bytes);
      for (std::size_t k = 0; k < pins.size(); ++k) CHECK(pins[k].get() == pinned_at[k]);
      pins.clear();
      for (std::size_t i = 0; i < count; ++i) {
        s.read(hs[i], data);
        CHECK(std::all_of(data.begin(), data.end(), [&](std::byte b) { return b == std::byte(i % 251); }));
      }
    }
  }
}

TEST_CASE("a full shuffle moves every entry but a pinned one, and lays them out in a fresh random order") {
  constexpr std::size_t count = 20000;  // 16 bytes each: about 80 arenas of 4 KiB
  shuffler s({.cipher = cipher_kind::none, .arena_size = 4 * 1024, .plaintext_in_place = true});
  std::vector<handle> hs;
  for (std::uint64_t i = 0; i < count; ++i) {
    hs.push_back(s.alloc<std::uint64_t>(2));
    s.write(hs.back(), std::as_bytes(std::span(&i, 1)));
  }
  const std::size_t pinned = count / 2;
  auto lease = s.rent<std::uint64_t>(hs[pinned]);
  const auto pinned_at = reinterpret_cast<std::uintptr_t>(lease.get());
  std::vector<handle> others = hs;
  others.erase(others.begin() + static_cast<std::ptrdiff_t>(pinned));
  std::vector<std::uintptr_t> before = addresses(s, others);
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    s.shuffle();
    const std::vector<std::uintptr_t> after = addresses(s, others);
    std::size_t stayed = 0;
    for (std::size_t i = 0; i < after.size(); ++i) stayed += after[i] == before[i];
    CHECK(stayed == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(lease.get()) == pinned_at);
    const double from_previous = rank_correlation(ranks(after), ranks(before));
    CAPTURE(from_previous);
    CHECK(std::abs(from_previous) < 0.5);
    CHECK(neighbours_kept(ranks(before), ranks(after)) < 0.05);
    before = after;
  }
  CHECK(s.stats().arenas <= count * 16 / 4096 + 3);  // the pinned entry's arena and the one being filled
  for (std::uint64_t i = 0; i < count; ++i) {
    if (i == pinned) continue;
    std::uint64_t v = 0;
    s.read(hs[i], std::as_writable_bytes(std::span(&v, 1)));
    CHECK(v == i);
  }
}

TEST_CASE("shuffle_every moves every entry arena by arena, never holding two copies of the heap") {
  const std::size_t arena = 4096, count = 2048;
  tracking_resource track;
  // Each entry: an alloc and a write (a rent and a return), then a rent and a return to
  // read its address: 5 operations. The next one after those shuffles.
  shuffler s({.cipher = cipher_kind::none, .shuffle_every = 5 * count + 1, .arena_size = arena,
              .plaintext_in_place = true},
             &track);
  std::vector<handle> hs;
  for (std::uint64_t i = 0; i < count; ++i) {
    hs.push_back(s.alloc<std::uint64_t>(8));
    s.write(hs.back(), std::as_bytes(std::span(&i, 1)));
  }
  const std::vector<std::uintptr_t> before = addresses(s, hs);
  const std::size_t held = track.stats().current_bytes;
  REQUIRE(track.stats().peak_bytes == held);  // nothing was given back so far
  REQUIRE(s.stats().shuffles == 0);
  s.create<int>();
  CHECK(s.stats().shuffles == 1);
  // A full shuffle would have held every old arena and the new copies at once.
  CHECK(track.stats().peak_bytes <= held + 4 * (arena + 64));
  const std::vector<std::uintptr_t> after = addresses(s, hs);
  for (std::size_t i = 0; i < count; ++i) {
    CAPTURE(i);
    CHECK(after[i] != before[i]);
    std::uint64_t v = 0;
    s.read(hs[i], std::as_writable_bytes(std::span(&v, 1)));
    CHECK(v == i);
  }
}

TEST_CASE("shuffle_every moves every entry but a pinned one, whose arena stays with the entries it keeps") {
  const std::size_t arena = 4096, count = 512;
  recording_resource up;
  // Operations: an alloc and a write (a rent and a return) per entry, a free per freed
  // one, two reads of the kept ones' addresses (a rent and a return each), the rent of
  // the pin, and the create that shuffles.
  shuffler s({.cipher = cipher_kind::none, .shuffle_every = 3 * count + count / 2 + 2 * count + 2, .arena_size = arena,
              .plaintext_in_place = true},
             &up);
  std::vector<handle> hs;
  for (std::uint64_t i = 0; i < count; ++i) {
    hs.push_back(s.alloc<std::uint64_t>(8));
    s.write(hs.back(), std::as_bytes(std::span(&i, 1)));
  }
  for (std::size_t i = 0; i < count; i += 2) s.free(hs[i]);  // half freed, in every arena
  std::vector<handle> kept;
  for (std::size_t i = 1; i < count; i += 2) kept.push_back(hs[i]);
  const std::vector<std::uintptr_t> before = addresses(s, kept);  // 2 operations each
  std::vector<std::uintptr_t> again = addresses(s, kept);           // 2 more
  REQUIRE(again == before);
  REQUIRE(s.stats().shuffles == 0);
  const std::size_t pinned = kept.size() / 2;
  {
    auto l = s.rent<std::uint64_t>(kept[pinned]);
    s.create<int>();  // the operation that shuffles
    CHECK(s.stats().shuffles == 1);
    CHECK(reinterpret_cast<std::uintptr_t>(l.get()) == before[pinned]);
    CHECK(*l == 2 * pinned + 1);
  }
  const std::vector<std::uintptr_t> after = addresses(s, kept);
  for (std::size_t i = 0; i < kept.size(); ++i) {
    CAPTURE(i);
    if (i != pinned) CHECK(after[i] != before[i]);
    std::uint64_t v = 0;
    s.read(kept[i], std::as_writable_bytes(std::span(&v, 1)));
    CHECK(v == 2 * i + 1);
  }
  CHECK(after[pinned] == before[pinned]);
  CHECK(s.stats().pending_free_entries == 0);
  // Eight words each; the int created moved too.
  CHECK(s.stats().bytes_moved == 8 * sizeof(std::uint64_t) * (kept.size() - 1) + sizeof(int));
  CHECK(up.outstanding_bytes() == s.stats().reserved_bytes);
}

TEST_CASE("running out of memory inside a shuffle changes nothing") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  for (cipher_kind c : all_ciphers) {
    CAPTURE(static_cast<int>(c));
    recording_resource up;
    shuffler s({.cipher = c, .arena_size = 2048}, &up);
    model m;
    for (int i = 0; i < 40; ++i) {
      const handle h = alloc_random(s, m, rng);
      m.entries[h].bytes = random_bytes(rng, m.entries[h].bytes.size());
      s.write(h, m.entries[h].bytes);
    }
    for (int i = 0; i < 10; ++i) {
      const handle h = m.pick(rng);
      s.free(h);
      m.entries.erase(h);
    }
    for (bool incremental : {false, true}) {
      CAPTURE(incremental);
      for (std::size_t n = 0;; ++n) {
        CAPTURE(n);
        const snapshot before = snap(s);
        const auto moved = s.stats().bytes_moved;
        up.fail_after(n);
        try {
          if (incremental) s.shuffle(std::size_t{16} * 1024);
          else s.shuffle();
          up.fail_never();
          break;
        } catch (const std::bad_alloc&) {
          up.fail_never();
          REQUIRE(snap(s) == before);
          REQUIRE(s.stats().bytes_moved == moved);
          check_model(s, m);
        }
      }
      check_model(s, m);
    }
  }
}

TEST_CASE("after 1000 shuffles of a steady heap reserved bytes stay within 1.1 x live plus one arena") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  const std::size_t arena = 16 * 1024;
  recording_resource up;
  shuffler s({.arena_size = arena}, &up);
  std::vector<handle> hs;
  for (int i = 0; i < 400; ++i) hs.push_back(s.alloc<std::byte>(16 + rng() % 500));
  for (int round = 0; round < 1000; ++round) {
    for (int k = 0; k < 10; ++k) {  // churn at a steady size
      const std::size_t i = rng() % hs.size();
      const std::size_t n = s.size_of(hs[i]);
      s.free(hs[i]);
      hs[i] = s.alloc<std::byte>(n);
    }
    s.shuffle();
    const auto st = s.stats();
    CAPTURE(round);
    REQUIRE(static_cast<double>(st.reserved_bytes) <= 1.1 * static_cast<double>(st.live_bytes) + arena);
    REQUIRE(st.reserved_bytes == up.outstanding_bytes());
  }
}

TEST_CASE("after free and shuffle the upstream has the memory back, and nothing leaks after destruction") {
  tracking_resource track;
  {
    shuffler s({.arena_size = 8 * 1024}, &track);
    std::vector<handle> hs;
    for (int i = 0; i < 1000; ++i) hs.push_back(s.alloc<std::uint64_t>(8));
    const std::size_t full = track.stats().current_bytes;
    CHECK(full >= 1000 * 64);
    for (std::size_t i = 0; i < hs.size(); ++i)
      if (i % 10 != 0) s.free(hs[i]);
    CHECK(track.stats().current_bytes == full);  // deferred: nothing given back yet
    s.shuffle();
    CHECK(track.stats().current_bytes < full / 5);
    CHECK(s.stats().reserved_bytes == track.stats().current_bytes);
    CHECK(s.stats().arenas_released > 0);
  }
  CHECK_FALSE(track.has_leaks());
  CHECK(track.stats().bad_deallocations == 0);
}

TEST_CASE("an incremental shuffle moves about its budget per call and finishes the pass") {
  recording_resource up;
  shuffler s({.cipher = cipher_kind::none, .randomize_layout = false, .arena_size = 4096}, &up);
  std::vector<handle> hs;
  for (int i = 0; i < 256; ++i) hs.push_back(s.alloc<std::byte>(64));
  for (std::size_t i = 0; i < hs.size(); i += 2) s.free(hs[i]);
  const std::size_t arenas_before = s.stats().arenas;
  int calls = 0;
  std::uint64_t moved = 0;
  while (s.stats().shuffles == 0) {
    s.shuffle(640);
    const std::uint64_t now = s.stats().bytes_moved;
    CHECK(now - moved <= 640);  // 64-byte entries: never more than the budget
    moved = now;
    ++calls;
    REQUIRE(calls < 1000);
  }
  CHECK(moved == 128 * 64);
  CHECK(calls >= 128 * 64 / 640);
  CHECK(s.stats().arenas < arenas_before);
  CHECK(s.stats().pending_free_entries == 0);
  CHECK(s.stats().reserved_bytes == up.outstanding_bytes());
}

TEST_CASE("an incremental shuffle step looks at a bounded number of slots however sparse the table") {
  recording_resource up;
  shuffler s({.cipher = cipher_kind::none, .arena_size = 4096}, &up);
  std::vector<handle> hs;
  for (int i = 0; i < 20000; ++i) hs.push_back(s.alloc<std::byte>(16));
  for (std::size_t i = 10; i < hs.size(); ++i) s.free(hs[i]);
  s.shuffle();  // 20,000 slots, 10 of them live
  int calls = 0;
  while (s.stats().shuffles == 1) {
    s.shuffle(1024);
    ++calls;
    REQUIRE(calls < 100000);
  }
  // Each empty slot counts as 16 bytes of the budget: 20,000 slots take 300 calls or so
  // (a step that walked to the next live entry would finish in 10).
  CHECK(calls >= 20000 * 16 / 1024 - 10);
  CHECK(calls <= 20000 * 16 / 1024 + 20);
  for (std::size_t i = 0; i < 10; ++i) CHECK(s.valid(hs[i]));
}

TEST_CASE("shuffle_every shuffles after that many operations") {
  shuffler s({.cipher = cipher_kind::none, .shuffle_every = 10});
  std::vector<handle> hs;
  for (int i = 0; i < 9; ++i) hs.push_back(s.create<int>());
  CHECK(s.stats().shuffles == 0);
  hs.push_back(s.create<int>());
  CHECK(s.stats().shuffles == 1);
  for (int i = 0; i < 5; ++i) {
    auto l = s.rent<int>(hs[0]);  // a rent and a return: two operations
  }
  CHECK(s.stats().shuffles == 2);
}

TEST_CASE("shuffle_above_ratio compacts once reserved bytes outgrow live bytes") {
  const std::size_t arena = 4096;
  shuffler s({.cipher = cipher_kind::none, .shuffle_above_ratio = 1.5, .arena_size = arena});
  std::vector<handle> hs;
  for (int i = 0; i < 512; ++i) hs.push_back(s.alloc<std::byte>(64));
  for (std::size_t i = 0; i < hs.size(); ++i)
    if (i % 4 != 0) s.free(hs[i]);  // three quarters freed, in every arena
  CHECK(s.stats().shuffles == 0);
  s.create<int>();  // the ratio is checked after an alloc
  const auto st = s.stats();
  CHECK(st.shuffles == 1);
  CHECK(static_cast<double>(st.reserved_bytes) <= 1.5 * static_cast<double>(st.live_bytes) + arena);
}

TEST_CASE("the ratio policy compacts arena by arena, never holding two copies of the heap") {
  const std::size_t arena = 4096;
  tracking_resource track;
  shuffler s({.cipher = cipher_kind::aes_256_gcm, .shuffle_above_ratio = 1.5, .arena_size = arena}, &track);
  std::vector<handle> hs;
  for (std::uint64_t i = 0; i < 4096; ++i) {
    hs.push_back(s.create<std::uint64_t>());
    *s.rent<std::uint64_t>(hs.back()) = i;
  }
  for (std::size_t i = 0; i < hs.size(); ++i)
    if (i % 4 != 0) s.free(hs[i]);
  const std::size_t before = track.stats().current_bytes;
  REQUIRE(track.stats().peak_bytes == before);  // nothing was given back so far
  const std::size_t live = s.stats().live_bytes + 1024 * 16;  // with the GCM tags
  s.create<int>();  // crosses the ratio
  CHECK(s.stats().shuffles == 1);
  // A full shuffle would have held every old arena and the new copies at once.
  CHECK(track.stats().peak_bytes <= before + 3 * (arena + 64));
  CHECK(track.stats().peak_bytes < before + live);
  const auto st = s.stats();
  CHECK(static_cast<double>(st.reserved_bytes) <= 1.5 * static_cast<double>(st.live_bytes + 16 * st.live_entries) + arena);
  for (std::size_t i = 0; i < hs.size(); i += 4) CHECK(*s.rent<std::uint64_t>(hs[i]) == i);
}

namespace {
// A heap of 64-byte entries in 4 KiB arenas: the first half of the arenas full, the
// second half sparse (one entry in eight kept, the rest freed). Arenas are told apart
// by address: within one, entries follow each other 64 bytes apart; the next arena's
// chunk lies elsewhere (past the arena's header at least).
struct sparse_heap {
  static constexpr std::size_t arena = 4096, arenas = 32;
  recording_resource up;
  shuffler s;
  std::vector<handle> full, sparse;  // kept, in allocation order
  std::vector<std::size_t> sparse_group;  // each sparse entry's arena, counted in allocation order
  std::vector<std::uintptr_t> full_at, sparse_at;
  std::size_t freed = 0;

  explicit sparse_heap(bool randomize = true, bool pin_one = false)
      : s({.cipher = cipher_kind::none, .shuffle_above_ratio = 1.5, .randomize_layout = randomize,
           .arena_size = arena, .plaintext_in_place = true},
          &up) {
    std::vector<handle> all;
    std::vector<std::size_t> group;
    std::uintptr_t last = 0;
    for (std::size_t g = 0; g < arenas;) {
      const handle h = s.alloc<std::byte>(64);
      const auto at = reinterpret_cast<std::uintptr_t>(s.rent_pointer<std::byte*>(h));
      s.return_pointer(h);
      if (!all.empty() && at != last + 64 && ++g == arenas) {
        s.free(h);  // the first entry of one arena too many
        ++freed;
        break;
      }
      const std::uint64_t value = all.size();
      s.write(h, std::as_bytes(std::span(&value, 1)));
      all.push_back(h), group.push_back(g), last = at;
    }
    std::size_t in_group = 0;
    for (std::size_t i = 0; i < all.size(); ++i) {
      in_group = i > 0 && group[i] == group[i - 1] ? in_group + 1 : 0;
      if (group[i] < arenas / 2 || in_group % 8 == 0) values[all[i]] = i;
      if (group[i] < arenas / 2) {
        full.push_back(all[i]);
      } else if (in_group % 8 == 0) {
        sparse.push_back(all[i]);
        sparse_group.push_back(group[i]);
      } else {
        s.free(all[i]);
        ++freed;
      }
    }
    full_at = addresses(s, full);
    sparse_at = addresses(s, sparse);
    if (pin_one) pinned.emplace(s.rent<std::byte>(sparse[sparse.size() / 2]));
  }
  std::optional<lease<std::byte>> pinned;

  std::map<handle, std::uint64_t> values;  // what each kept entry holds
  bool values_kept() {
    for (const auto& [h, value] : values) {
      std::uint64_t v = 0;
      s.read(h, std::as_writable_bytes(std::span(&v, 1)));
      if (v != value) return false;
    }
    return true;
  }
};
}  // namespace

TEST_CASE("the ratio policy empties the sparsest arenas into new room and leaves full ones where they are") {
  sparse_heap h;
  REQUIRE(h.s.stats().shuffles == 0);
  REQUIRE(h.s.stats().pending_free_entries == h.freed);
  const auto before = h.s.stats();
  h.s.create<int>();  // the ratio is checked after an alloc
  const auto st = h.s.stats();
  CHECK(st.shuffles == 1);
  CHECK(addresses(h.s, h.full) == h.full_at);  // not one byte of a full arena moved
  const std::vector<std::uintptr_t> now = addresses(h.s, h.sparse);
  std::size_t moved = 0;
  for (std::size_t i = 0; i < now.size(); ++i) {
    // Only the arena being filled (the last one) is no source.
    CAPTURE(i);
    CHECK((now[i] != h.sparse_at[i] || h.sparse_group[i] == sparse_heap::arenas - 1));
    moved += now[i] != h.sparse_at[i];
  }
  CHECK(moved >= h.sparse.size() - 8);
  // The work follows what was reclaimed: the sparse arenas' entries, nothing else.
  CHECK(st.bytes_moved - before.bytes_moved == 64 * moved);
  CHECK(st.arenas_released - before.arenas_released >= sparse_heap::arenas / 2 - 1);
  CHECK(st.pending_free_entries == 0);  // every freed entry dropped, sparse arena or not
  CHECK(static_cast<double>(st.reserved_bytes) <= 1.5 * static_cast<double>(st.live_bytes) + sparse_heap::arena);
  CHECK(h.values_kept());
  CHECK(h.up.outstanding_bytes() == st.reserved_bytes);
}

TEST_CASE("a compaction leaves the arena of a pinned entry where it is") {
  sparse_heap h(true, true);
  const std::size_t pinned = h.sparse.size() / 2;
  h.s.create<int>();
  CHECK(h.s.stats().shuffles == 1);
  const std::vector<std::uintptr_t> now = addresses(h.s, h.sparse);
  CHECK(reinterpret_cast<std::uintptr_t>(h.pinned->get()) == h.sparse_at[pinned]);
  std::size_t moved = 0;
  for (std::size_t i = 0; i < now.size(); ++i) {
    CAPTURE(i);
    if (h.sparse_group[i] == h.sparse_group[pinned]) CHECK(now[i] == h.sparse_at[i]);
    moved += now[i] != h.sparse_at[i];
  }
  CHECK(moved >= h.sparse.size() - 16);  // all but the pinned arena and the one being filled
  CHECK(h.s.stats().pending_free_entries == 0);
  h.pinned.reset();
  CHECK(h.values_kept());
}

TEST_CASE("a compaction lays out what it moves at random with randomize_layout, in order without") {
  for (bool randomize : {true, false}) {
    CAPTURE(randomize);
    sparse_heap h(randomize);
    h.s.create<int>();
    REQUIRE(h.s.stats().shuffles == 1);
    // The order before: the order of allocation (sources go in the order they were
    // filled, each one's entries by address), whatever the arenas' own addresses.
    std::vector<double> order;
    std::vector<std::uintptr_t> to;
    const std::vector<std::uintptr_t> now = addresses(h.s, h.sparse);
    for (std::size_t i = 0; i < now.size(); ++i)
      if (now[i] != h.sparse_at[i]) order.push_back(static_cast<double>(order.size())), to.push_back(now[i]);
    REQUIRE(order.size() > 100);
    const double kept = neighbours_kept(order, ranks(to));
    CAPTURE(kept);
    if (randomize) CHECK(kept < 0.3);
    else CHECK(kept > 0.9);
  }
}

TEST_CASE("a compaction without memory for a window moves nothing of it, and still drops the freed entries") {
  sparse_heap h;
  h.up.fail_after(0, false);  // no new arena: the moves find no room
  h.s.create<int>();          // fits in the arena being filled
  auto st = h.s.stats();
  CHECK(st.shuffles == 0);
  CHECK(st.pending_free_entries == 0);
  CHECK(addresses(h.s, h.full) == h.full_at);
  CHECK(addresses(h.s, h.sparse) == h.sparse_at);
  CHECK(h.values_kept());
  h.up.fail_never();
  h.s.create<int>();
  CHECK(h.s.stats().shuffles == 1);
  CHECK(addresses(h.s, h.full) == h.full_at);
  CHECK(h.values_kept());
}

TEST_CASE("sealed<T> frees its entry when it ends, or when the last lease on it ends") {
  shuffler s;
  handle h{};
  {
    sealed<std::uint64_t> secret(s);
    h = secret.id();
    *secret.open() = 5;
    CHECK(*secret.open() == 5);
  }
  CHECK_FALSE(s.valid(h));
  lease<std::uint64_t> l;
  {
    sealed<std::uint64_t> secret(s, 4);
    h = secret.id();
    l = secret.open();
    l.span()[3] = 9;
  }
  CHECK_FALSE(s.valid(h));  // gone for callers at once...
  CHECK(l.span()[3] == 9);  // ...while the open lease still works
  CHECK(s.stats().live_entries == 1);
  l.reset();
  CHECK(s.stats().live_entries == 0);
  sealed<int> kept(s);
  const handle owned = kept.release();
  CHECK(s.valid(owned));
  auto adopted = sealed<int>::adopt(s, owned);
  CHECK(adopted.id() == owned);
}

TEST_CASE("a plaintext window holds the lease and the arena keeps ciphertext meanwhile") {
  recording_resource up, plain;
  shuffler s({.cipher = cipher_kind::aes_256_ctr, .plaintext_resource = &plain}, &up);
  const handle h = s.alloc<char>(32);
  const std::string secret = "window-marker-0123456789";
  {
    auto l = s.rent<char>(h);
    std::copy(secret.begin(), secret.end(), l.get());
    const auto blocks = plain.live_blocks();
    REQUIRE(blocks.size() == 1);
    CHECK(static_cast<void*>(l.get()) == blocks[0].p);
  }
  CHECK(plain.outstanding() == 0);
  CHECK_FALSE(up.contains(std::as_bytes(std::span(secret))));
  std::vector<std::byte> out(secret.size());
  s.read(h, out);
  CHECK(std::equal(out.begin(), out.end(), std::as_bytes(std::span(secret)).begin()));
}

TEST_CASE("metadata is 32 bytes per table slot") {
  shuffler s;
  for (int i = 0; i < 100; ++i) s.create<int>();
  CHECK(s.stats().metadata_bytes == 100 * 32);
}

TEST_CASE("a table of a huge page or more reports its metadata on huge pages, or the fallback") {
  shuffler s({.cipher = cipher_kind::none});
  for (int i = 0; i < 100; ++i) s.create<int>();
  CHECK(s.stats().metadata_huge_page_bytes == 0);  // 8 KiB of slots: ordinary pages
  const std::size_t page = memshuffle::detail::huge_page_resource::page_size();
  while (s.stats().metadata_bytes < 2 * page) s.create<int>();
  const shuffler_stats st = s.stats();
  if (memshuffle::detail::huge_page_resource::advice_taken()) {
    CHECK(st.metadata_huge_page_bytes == st.metadata_bytes);
  } else {
    CHECK(st.metadata_huge_page_bytes == 0);
    MESSAGE("no transparent huge pages here: the handle table stays on ordinary pages");
  }
}

TEST_CASE("a handle from another shuffler is caught") {
  shuffler a, b;
  const handle ha = a.create<int>();
  const handle hb = b.create<int>();
  CHECK_FALSE(b.valid(ha));
  CHECK_FALSE(a.valid(hb));
  CHECK_THROWS_AS(b.rent<int>(ha), invalid_handle_error);
  CHECK(ha != invalid_handle);
}

#ifdef MEMSHUFFLE_ASAN
TEST_CASE("under the address sanitizer a raw pointer kept past a move is poisoned") {
  shuffler s({.cipher = cipher_kind::none, .arena_size = 4096, .plaintext_in_place = true});
  const handle h = s.alloc<std::uint64_t>(4);
  const handle pin = s.alloc<std::uint64_t>(4);  // pinned: keeps the old arena alive
  auto hold = s.rent<std::uint64_t>(pin);
  std::uint64_t* stale = s.rent_pointer<std::uint64_t*>(h);
  s.return_pointer(h);
  s.shuffle();
  CHECK(__asan_address_is_poisoned(stale));
  s.set_shuffle_on_return(true);
  std::uint64_t* again = s.rent_pointer<std::uint64_t*>(h);
  s.return_pointer(h);  // moves it alone
  CHECK(__asan_address_is_poisoned(again));
}
#endif


// --- fork ---------------------------------------------------------------------------

TEST_CASE("in a child of fork() every call throws fork_error, and ending the shuffler there touches nothing") {
  for (auto c : {cipher_kind::aes_256_ctr, cipher_kind::aes_256_gcm, cipher_kind::none}) {
    CAPTURE(static_cast<int>(c));
    recording_resource up, window;
    auto s = std::make_unique<shuffler>(shuffler_options{.cipher = c, .plaintext_resource = &window}, &up);
    const handle h = s->create<std::uint64_t>();
    const handle open = s->create<std::uint64_t>();
    const std::array<std::uint64_t, 1> answer{42};
    s->write(h, std::as_bytes(std::span(answer)));
    auto lease = s->rent<std::uint64_t>(open);  // a window open at the fork
    *lease = 7;
    const int status = memshuffle::testing::run_in_child([&] {
      const auto up_calls = up.allocations() + up.deallocations();
      const auto window_calls = window.allocations() + window.deallocations();
      int refused = 0;
      const auto expect_fork_error = [&](auto&& call) {
        try {
          call();
        } catch (const fork_error&) {
          ++refused;
        } catch (...) {
        }
      };
      expect_fork_error([&] { (void)s->create<int>(); });
      expect_fork_error([&] { (void)s->rent<std::uint64_t>(h); });
      expect_fork_error([&] { s->return_pointer(open); });
      expect_fork_error([&] { s->free(h); });
      expect_fork_error([&] { (void)s->size_of(h); });
      expect_fork_error([&] { s->shuffle(); });
      expect_fork_error([&] { s->shuffle(64); });
      expect_fork_error([&] { s->rotate_key(); });
      expect_fork_error([&] { s->set_shuffle_on_return(true); });
      expect_fork_error([&] { (void)s->stats(); });
      const bool none_valid = !s->valid(h) && !s->valid(open);
      lease.reset();  // ends quietly
      s.reset();      // abandoned: no upstream or window call, no wipe of the parent's data
      return refused == 10 && none_valid && up.allocations() + up.deallocations() == up_calls &&
             window.allocations() + window.deallocations() == window_calls;
    });
    CHECK_MESSAGE(memshuffle::testing::exited_with(status, 0), memshuffle::testing::describe(status));
    // The parent goes on unaffected.
    CHECK(*lease == 7);
    lease.reset();
    std::array<std::uint64_t, 1> v{};
    s->read(h, std::as_writable_bytes(std::span(v)));
    CHECK(v[0] == 42);
    s->rotate_key();
    s->shuffle();
    s->read(open, std::as_writable_bytes(std::span(v)));
    CHECK(v[0] == 7);
  }
}

TEST_CASE("a static shuffler ends at exit in a child of fork() without a crash") {
  // exit() in the child also ends the test runner's own statics midway through a test
  // case, which the sanitizers report; the destructor's path is the one the test
  // above takes, in every build.
  if (detail::address_sanitizer || detail::thread_sanitizer) return;
  static shuffler s;  // made in the parent, destroyed at the child's exit
  static const handle h = s.create<std::uint64_t>();
  const std::array<std::uint64_t, 1> nine{9};
  s.write(h, std::as_bytes(std::span(nine)));
  const int status = memshuffle::testing::run_in_child([&] {
    std::cout.flush();
    std::exit(s.valid(h) ? 1 : 0);  // runs the static destructors in the child
    return false;
  });
  CHECK_MESSAGE(memshuffle::testing::exited_with(status, 0), memshuffle::testing::describe(status));
  std::array<std::uint64_t, 1> v{};
  s.read(h, std::as_writable_bytes(std::span(v)));
  CHECK(v[0] == 9);
}

// --- tags -----------------------------------------------------------------------------

TEST_CASE("a handle is never valid in another shuffler, however many shufflers the process makes") {
  // A 16-bit tag from a counter once repeated after 65,535 more shufflers, and a handle
  // of one shuffler then read another's entry.
  shuffler first({.cipher = cipher_kind::none});
  const handle kept = first.create<std::uint32_t>();
  std::set<std::uint64_t> seen{static_cast<std::uint64_t>(kept)};
  std::deque<std::pair<std::unique_ptr<shuffler>, handle>> overlapping;
  std::size_t foreign_valid = 0, repeated = 0;
  constexpr int total = 70'000;
  for (int i = 0; i < total; ++i) {
    auto s = std::make_unique<shuffler>(shuffler_options{.cipher = cipher_kind::none});
    const handle h = s->create<std::uint32_t>();
    if (!seen.insert(static_cast<std::uint64_t>(h)).second) ++repeated;
    if (s->valid(kept)) ++foreign_valid;
    if (!overlapping.empty() && (s->valid(overlapping.back().second) || overlapping.back().first->valid(h)))
      ++foreign_valid;
    if (i % 3 == 0) {  // a third overlap with the next 64 made, the rest end at once
      overlapping.emplace_back(std::move(s), h);
      if (overlapping.size() > 64) overlapping.pop_front();
    }
  }
  CHECK(foreign_valid == 0);
  CHECK(repeated == 0);
  CHECK(first.valid(kept));
}

}  // TEST_SUITE

TEST_SUITE("concurrency") {

TEST_CASE("several threads allocate, rent, mutate, return, free and shuffle at once") {
  MEMSHUFFLE_TEST_SEED(seed);
  for (cipher_kind c : {cipher_kind::aes_256_ctr, cipher_kind::aes_256_gcm, cipher_kind::none}) {
    CAPTURE(static_cast<int>(c));
    recording_resource up;
    {
      shuffler s({.cipher = c, .shuffle_every = 97, .arena_size = 8 * 1024}, &up);
      constexpr int threads = 4, steps = 1500;
      std::vector<handle> shared;
      for (int i = 0; i < 4; ++i) shared.push_back(s.create<std::uint64_t>());
      std::atomic<int> running{threads};
      std::atomic<bool> failed{false};
      std::atomic<std::uint64_t> increments{0};
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          std::mt19937_64 rng(seed + static_cast<std::uint64_t>(t));
          std::map<handle, std::uint64_t> mine;  // each private entry: words of one value
          const auto check = [&](handle h) {
            auto l = s.rent<std::uint64_t>(h);
            for (std::uint64_t v : l.span())
              if (v != mine[h]) failed = true;
          };
          for (int i = 0; i < steps; ++i) {
            const unsigned op = static_cast<unsigned>(rng() % 10);
            if (mine.size() < 3 || op < 3) {
              mine[s.alloc<std::uint64_t>(1 + rng() % 64)] = 0;  // sizes vary: rotations size buffers
            } else if (op < 5) {
              auto it = mine.begin();
              std::advance(it, static_cast<long>(rng() % mine.size()));
              check(it->first);
              s.free(it->first);
              mine.erase(it);
            } else if (op < 8) {
              auto it = mine.begin();
              std::advance(it, static_cast<long>(rng() % mine.size()));
              check(it->first);
              auto l = s.rent<std::uint64_t>(it->first);
              it->second = rng();
              std::fill(l.span().begin(), l.span().end(), it->second);
            } else {
              auto l = s.rent<std::uint64_t>(shared[rng() % shared.size()]);
              std::atomic_ref<std::uint64_t>(*l).fetch_add(1);
              ++increments;
            }
          }
          for (auto& [h, v] : mine) check(h);
          --running;
        });
      }
      pool.emplace_back([&] {  // one thread shuffles and rotates meanwhile
        for (int i = 0; running > 0; ++i) {
          if (i % 3 == 0) s.shuffle();
          else s.shuffle(4096);
          if (i % 10 == 0) s.rotate_key();
          if (i % 7 == 0) s.stats();
        }
      });
      for (auto& th : pool) th.join();
      CHECK_FALSE(failed.load());
      std::uint64_t total = 0;
      for (handle h : shared) total += *s.rent<std::uint64_t>(h);
      CHECK(total == increments.load());
      const auto st = s.stats();
      CHECK(st.pinned_entries == 0);
      CHECK(st.live_entries >= shared.size());
    }
    CHECK(up.outstanding() == 0);
    CHECK(up.mismatches() == 0);
  }
}

TEST_CASE("key rotations racing the first return of new entries of growing sizes lose nothing") {
  // The first encryption of an entry may still be under way when a rotation starts;
  // the rotation must then re-encrypt it too, whatever its size.
  shuffler s({.cipher = cipher_kind::aes_256_gcm});
  std::atomic<bool> done{false}, failed{false};
  std::thread rotator([&] {
    while (!done) s.rotate_key();
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < 2; ++t) {
    writers.emplace_back([&, t] {
      for (std::size_t i = 1; i <= 400; ++i) {
        const std::size_t n = i * 64 + static_cast<std::size_t>(t);
        const handle h = s.alloc<std::byte>(n);
        std::vector<std::byte> value(n, static_cast<std::byte>(i));
        s.write(h, value);
        std::vector<std::byte> back(n);
        s.read(h, back);
        if (back != value) failed = true;
        if (i % 2 == 0) s.free(h);
      }
    });
  }
  for (auto& w : writers) w.join();
  done = true;
  rotator.join();
  CHECK_FALSE(failed.load());
  CHECK(s.stats().key_rotations > 0);
}

TEST_CASE("a key rotation of a large heap lets other threads rent and return while it re-encrypts") {
  // The rotation's AES work runs outside the lock, a batch at a time. Progress is read
  // from the decryptions counted so far, less the probe's own: were the lock held
  // throughout, every rent would see the rotation either not begun or done.
  shuffler s({.cipher = cipher_kind::aes_256_gcm});
  constexpr std::size_t entries = 4096, size = 4096;
  std::vector<handle> heap;
  for (std::size_t i = 0; i < entries; ++i) {
    heap.push_back(s.alloc<std::byte>(size));
    s.write(heap.back(), std::vector<std::byte>(size, static_cast<std::byte>(i)));  // re-encrypted by a rotation
  }
  const handle probe = s.create<std::uint64_t>();
  s.write(probe, std::as_bytes(std::span<const std::uint64_t>(std::array<std::uint64_t, 1>{0})));
  const std::uint64_t before = s.stats().decryptions;
  std::atomic<bool> finished{false};
  std::thread rotator([&] {
    s.rotate_key();
    finished = true;
  });
  std::uint64_t rents = 0, midway = 0;
  while (!finished) {
    ++*s.rent<std::uint64_t>(probe);  // one decryption of the probe each
    ++rents;
    const std::uint64_t progress = s.stats().decryptions - before - rents;
    if (progress > 0 && progress < entries) ++midway;
  }
  rotator.join();
  CAPTURE(rents);
  CHECK(midway > 0);
  CHECK(*s.rent<std::uint64_t>(probe) == rents);
  bool intact = true;
  std::vector<std::byte> back(size);
  for (std::size_t i = 0; i < entries; ++i) {
    s.read(heap[i], back);
    intact = intact && std::all_of(back.begin(), back.end(), [&](std::byte b) { return b == static_cast<std::byte>(i); });
  }
  CHECK(intact);
  CHECK(s.stats().integrity_failures == 0);
}

TEST_CASE("threads renting distinct entries and one entry all at once see consistent values") {
  shuffler s({.cipher = cipher_kind::aes_256_gcm});
  const handle counter = s.create<std::uint64_t>();
  constexpr int threads = 4, rounds = 2000;
  std::vector<handle> own;
  for (int t = 0; t < threads; ++t) own.push_back(s.alloc<std::uint64_t>(16));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = 0; i < rounds; ++i) {
        {
          auto l = s.rent<std::uint64_t>(own[static_cast<std::size_t>(t)]);
          for (auto& v : l.span()) ++v;
        }
        auto c = s.rent<std::uint64_t>(counter);
        std::atomic_ref<std::uint64_t>(*c).fetch_add(1);
      }
    });
  }
  for (auto& th : pool) th.join();
  CHECK(*s.rent<std::uint64_t>(counter) == threads * rounds);
  for (handle h : own) {
    auto l = s.rent<std::uint64_t>(h);
    CHECK(std::all_of(l.span().begin(), l.span().end(), [](std::uint64_t v) { return v == rounds; }));
  }
  const auto st = s.stats();
  CHECK(st.encryptions >= st.decryptions);
}

TEST_CASE("an entry made and freed between a full shuffle's parts is dropped by a later shuffle, not lost") {
  shuffler s({.cipher = cipher_kind::none, .arena_size = 4096, .shards = 1});
  std::vector<handle> hs;
  for (int i = 0; i < 20000; ++i) hs.push_back(s.alloc<std::uint64_t>(1));
  for (int i = 0; i < 100; ++i) s.free(hs[hs.size() - 1 - i]);  // their slots go back to the free list
  hs.resize(hs.size() - 100);
  s.shuffle();
  // One part begins the shuffle; the new entry takes a recycled slot the gather has not
  // reached yet, in an arena opened after the shuffle began.
  REQUIRE(memshuffle::detail::full_shuffle_part(s, hs[0]));
  const handle late = s.alloc<std::uint64_t>(1);
  s.free(late);
  while (memshuffle::detail::full_shuffle_part(s, hs[0])) {
  }
  CHECK(s.stats().pending_free_entries == 1);  // its arena was not in the shuffle: it waits
  for (const handle h : hs) s.free(h);
  while (s.stats().pending_free_entries != 0) s.shuffle(std::size_t{1} << 20);
  // Every entry was freed and dropped one by one: no arena is left counting a lost entry.
  CHECK(s.stats().arenas == 0);
  CHECK(s.stats().live_entries == 0);
}

TEST_CASE("a full shuffle moves large entries fewer at a time, so a part takes about as long whatever their size") {
  const auto parts = [](std::size_t bytes) {
    shuffler s({.cipher = cipher_kind::none, .shards = 1});
    std::vector<handle> hs;
    for (int i = 0; i < 2048; ++i) hs.push_back(s.alloc<std::byte>(bytes));
    std::size_t n = 1;
    while (memshuffle::detail::full_shuffle_part(s, hs[0])) ++n;
    return n;
  };
  // 2,048 entries: 8 parts of 256 moves when small; 4 KiB ones, 128 KiB a part (32 moves).
  CHECK(parts(64) < 20);
  CHECK(parts(4096) >= 2048 / 32);
}

TEST_CASE("a full shuffle lets other threads in between its parts, and an entry they rent meanwhile stays put") {
  // In place: a rented entry's plaintext is in the arena, so moving it would show.
  shuffler s({.arena_size = 4096, .plaintext_in_place = true});
  std::vector<handle> hs;
  for (std::uint64_t i = 0; i < 200000; ++i) {
    hs.push_back(s.alloc<std::uint64_t>(2));
    s.write(hs.back(), std::as_bytes(std::span<const std::uint64_t>(std::array<std::uint64_t, 2>{i, ~i})));
  }
  std::atomic<bool> running{false}, done{false}, failed{false};
  bool seen_mid = false;  // a moment when some entries had moved and the shuffle was not over
  bool held_once = false;
  std::thread other([&] {
    std::mt19937_64 rng(42);
    while (!done) {
      running = true;
      const std::size_t i = rng() % hs.size();
      auto l = s.rent<std::uint64_t>(hs[i]);
      const std::uint64_t* p = l.get();
      const auto st = s.stats();  // the lock, with the entry pinned
      if (st.bytes_moved > 0 && st.shuffles == 0) seen_mid = true;
      if (l.get() != p || p[0] != i || p[1] != ~std::uint64_t{i}) failed = true;
      l = {};
      if (!seen_mid || held_once) continue;
      // Once, mid-shuffle: many entries rented and held while parts run, then written
      // through their pointers. A write is lost if the shuffle moved its entry meanwhile.
      held_once = true;
      std::vector<std::size_t> picked;
      std::vector<lease<std::uint64_t>> held;
      const std::size_t base = rng() % hs.size();
      for (std::size_t k = 0; k < 2000; ++k) {
        picked.push_back((base + k * 97) % hs.size());  // distinct: 97 is prime to the size
        held.push_back(s.rent<std::uint64_t>(hs[picked.back()]));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      for (auto& h : held) h.get()[1] = 0;
      held.clear();
      for (const std::size_t k : picked) {
        auto again = s.rent<std::uint64_t>(hs[k]);
        if (again.get()[1] != 0) failed = true;
        again.get()[1] = ~std::uint64_t{k};
      }
    }
  });
  while (!running) std::this_thread::yield();
  s.shuffle();
  done = true;
  other.join();
  CHECK_FALSE(failed);
  CHECK(seen_mid);
  CHECK(s.stats().shuffles == 1);
  CHECK(s.stats().bytes_moved > 0);
  for (std::uint64_t i = 0; i < hs.size(); ++i) {
    auto l = s.rent<std::uint64_t>(hs[i]);
    REQUIRE(l.get()[0] == i);
    REQUIRE(l.get()[1] == ~i);
  }
}

}  // TEST_SUITE
