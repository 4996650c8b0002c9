// The heap alone: arenas over an instrumented upstream, placement, vacating, retiring.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <span>
#include <vector>

#include <memshuffle/tracking_resource.hpp>

#include "lib/heap.hpp"
#include "test/support/recording_resource.hpp"
#include "test/support/seed.hpp"

using memshuffle::detail::heap;
using memshuffle::detail::layout_rng;
using memshuffle::detail::request;
using memshuffle::testing::recording_resource;

namespace {

constexpr std::size_t arena_size = 4096;

bool aligned(const void* p, std::size_t a) { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

// A recognisable marker the tests look for in upstream memory.
constexpr std::array<std::byte, 8> marker{std::byte{0xC0}, std::byte{0xFF}, std::byte{0xEE}, std::byte{0x15},
                                          std::byte{0x60}, std::byte{0x0D}, std::byte{0xBE}, std::byte{0xEF}};

// Scans every block the upstream ever handed out (all kept: keep_freed) for needle. The
// heap poisons what entries leave, so the scan must not be checked by the sanitizer.
__attribute__((no_sanitize_address)) bool ever_held(const recording_resource& up,
                                                    std::span<const std::byte> needle) {
  for (const auto& b : up.history()) {
    const auto* p = static_cast<const std::byte*>(b.p);
    for (std::size_t i = 0; i + needle.size() <= b.bytes; ++i) {
      std::size_t k = 0;
      while (k < needle.size() && p[i + k] == needle[k]) ++k;
      if (k == needle.size()) return true;
    }
  }
  return false;
}

// A heap over an upstream that keeps what it frees readable, its first entry (64
// bytes) holding the marker.
struct marked_heap {
  recording_resource up;
  heap h{&up, arena_size};
  std::byte* first = nullptr;
  marked_heap() {
    up.keep_freed(true);
    first = h.place(64, 8);
    std::memcpy(first, marker.data(), marker.size());
  }
};

}  // namespace

TEST_SUITE("shuffler") {

TEST_CASE("placements keep every power-of-two alignment from 1 to 8192") {
  recording_resource up;
  {
    heap h(&up, arena_size);
    for (std::size_t a = 1; a <= 8192; a *= 2) {
      for (int k = 0; k < 3; ++k) {
        std::byte* p = h.place(24, a);
        CAPTURE(a);
        CHECK(aligned(p, a));
      }
    }
  }
  CHECK(up.outstanding() == 0);
  CHECK(up.mismatches() == 0);
}

TEST_CASE("each arena is one chunk from the upstream and a full arena makes way for a new one") {
  recording_resource up;
  heap h(&up, arena_size);
  std::vector<std::byte*> ps;
  for (int i = 0; i < 200; ++i) ps.push_back(h.place(64, 8));  // 12800 bytes: several arenas
  CHECK(h.arenas() >= 4);
  CHECK(up.outstanding() == h.arenas());
  CHECK(h.reserved_bytes() == up.outstanding_bytes());
  std::sort(ps.begin(), ps.end());
  for (std::size_t i = 1; i < ps.size(); ++i) CHECK(ps[i] - ps[i - 1] >= 64);  // no overlap
}

TEST_CASE("an entry larger than an arena gets an arena of its own") {
  recording_resource up;
  heap h(&up, arena_size);
  h.place(16, 8);
  std::byte* big = h.place(3 * arena_size, 64);
  CHECK(aligned(big, 64));
  CHECK(h.arenas() == 2);
  std::memset(big, 1, 3 * arena_size);  // all of it is usable
  h.place(16, 8);
  CHECK(h.arenas() == 2);  // small entries still go to the arena being filled
}

TEST_CASE("vacating the last entry of an arena gives the arena back, wiped") {
  marked_heap m;
  std::vector<std::byte*> fill;
  while (m.h.arenas() == 1) fill.push_back(m.h.place(64, 8));  // the first arena is now full
  REQUIRE(m.h.arenas() == 2);
  m.h.vacate(m.first, 64);
  CHECK_FALSE(ever_held(m.up, marker));  // wiped in place at once
  for (std::byte* p : fill)
    if (m.h.serial_of(p) == m.h.serial_of(fill.front())) m.h.vacate(p, 64);
  CHECK(m.h.arenas() == 1);
  CHECK(m.h.arenas_released() == 1);
  CHECK(m.up.deallocations() == 1);
  CHECK(m.h.reserved_bytes() == m.up.outstanding_bytes());
}

TEST_CASE("an emptied arena that is still being filled is rewound, not given back") {
  recording_resource up;
  heap h(&up, arena_size);
  std::byte* a = h.place(64, 8);
  h.vacate(a, 64);
  CHECK(h.arenas() == 1);
  std::byte* b = h.place(64, 8);
  CHECK(b == a);  // the same bytes again
  CHECK(up.allocations() == 1);
}

TEST_CASE("dropping an arena whose entries all left gives it back whole, wiped, without vacating them") {
  marked_heap m;
  while (m.h.arenas() == 1) m.h.place(64, 8);  // the first arena is full
  m.h.index_arenas();
  const std::uint32_t number = m.h.arena_number(m.first);
  CHECK(m.h.chunk_bytes(number) == m.up.history().front().bytes);
  CHECK_FALSE(m.h.filling(number));
  CHECK(m.h.filling(1 - number));
  m.h.drop(m.h.at(number));
  CHECK(m.h.arenas() == 1);
  CHECK(m.h.arenas_released() == 1);
  CHECK(m.up.deallocations() == 1);
  CHECK(m.h.reserved_bytes() == m.up.outstanding_bytes());
  CHECK_FALSE(ever_held(m.up, marker));
}

TEST_CASE("dropping the arena being filled wipes and rewinds it") {
  marked_heap m;
  m.h.place(64, 8);
  m.h.index_arenas();
  m.h.drop(m.h.at(m.h.arena_number(m.first)));
  CHECK(m.h.arenas() == 1);
  CHECK_FALSE(ever_held(m.up, marker));
  CHECK(m.h.place(64, 8) == m.first);  // the same bytes again
  CHECK(m.up.allocations() == 1);
}

namespace {
// Raw access to bytes the heap may have poisoned (padding, bytes above the fill).
__attribute__((no_sanitize_address)) void fill_raw(std::byte* p, std::size_t bytes, std::byte b) {
  for (std::size_t i = 0; i < bytes; ++i) p[i] = b;
}
__attribute__((no_sanitize_address)) bool raw_filled_with(const std::byte* p, std::size_t bytes, std::byte b) {
  for (std::size_t i = 0; i < bytes; ++i)
    if (p[i] != b) return false;
  return true;
}
}  // namespace

TEST_CASE("a chunk given back whole is wiped up to its fill, and the bytes above are left untouched") {
  marked_heap m;
  // What the upstream handed out above the fill (its arena_resource header aside): never
  // written by the heap, so wiping it would only fault in pages.
  auto* const chunk = static_cast<std::byte*>(m.up.history().front().p);
  const std::size_t chunk_bytes = m.up.history().front().bytes;
  std::byte* above = m.first + 64;
  const auto above_bytes = static_cast<std::size_t>(chunk + chunk_bytes - 64 - above);
  fill_raw(above, above_bytes, std::byte{0xAB});
  m.h.stop_filling();
  m.h.index_arenas();
  m.h.drop(m.h.at(m.h.arena_number(m.first)));
  REQUIRE(m.up.deallocations() == 1);
  CHECK_FALSE(ever_held(m.up, marker));
  CHECK(raw_filled_with(above, above_bytes, std::byte{0xAB}));
}

TEST_CASE("an arena whose entries all left one by one goes back without a second wipe") {
  recording_resource up;
  up.keep_freed(true);
  heap h(&up, arena_size);
  std::byte* a = h.place(8, 64);
  std::byte* b = h.place(8, 64);
  REQUIRE(b == a + 64);
  std::memcpy(a, marker.data(), marker.size());
  std::memcpy(b, marker.data(), marker.size());
  // The padding between them held no entry: a second wipe of the chunk would clear it.
  fill_raw(a + 8, 56, std::byte{0xAB});
  h.stop_filling();
  h.vacate(a, 8);
  h.vacate(b, 8);
  REQUIRE(up.deallocations() == 1);
  CHECK_FALSE(ever_held(up, marker));  // each entry wiped as it left
  CHECK(raw_filled_with(a + 8, 56, std::byte{0xAB}));
}

TEST_CASE("after stop_filling the next placement opens a new arena, and the old one stays") {
  recording_resource up;
  heap h(&up, arena_size);
  std::byte* a = h.place(64, 8);
  h.stop_filling();
  std::byte* b = h.place(64, 8);
  CHECK(h.arenas() == 2);
  CHECK(h.serial_of(b) > h.serial_of(a));
  h.vacate(a, 64);  // no longer filled: given back once empty
  CHECK(h.arenas() == 1);
}

TEST_CASE("place_all is all or nothing when the upstream fails") {
  recording_resource up;
  heap h(&up, arena_size);
  h.place(64, 8);
  const std::size_t reserved = h.reserved_bytes();
  std::vector<request> reqs(100, request{256, 16});  // needs several new arenas
  std::vector<std::byte*> out(reqs.size());
  for (std::size_t fail = 0;; ++fail) {
    up.fail_after(fail);
    try {
      h.place_all(reqs, out, true);
      up.fail_never();
      break;
    } catch (const std::bad_alloc&) {
      CAPTURE(fail);
      CHECK(h.arenas() == 1);
      CHECK(h.reserved_bytes() == reserved);
      CHECK(up.outstanding() == 1);
    }
  }
  CHECK(h.arenas() > 1);
  CHECK(up.mismatches() == 0);
}

TEST_CASE("a failed placement in the arena being filled rewinds it") {
  recording_resource up;
  heap h(&up, arena_size);
  std::byte* first = h.place(64, 8);
  std::vector<request> reqs(40, request{128, 8});  // more than the first arena's room
  std::vector<std::byte*> out(reqs.size());
  up.fail_after(0);
  CHECK_THROWS_AS(h.place_all(reqs, out, false), std::bad_alloc);
  std::byte* next = h.place(64, 8);
  CHECK(next == first + 64);  // what the failed call took from the arena is back
}

namespace {

// A full shuffle of the entries in old (all of one size, 8-aligned): one window per arena, arenas and entries in the order they were filled; with rng the
// heap interleaves them at random.
struct rolling {
  std::vector<memshuffle::detail::move> moves;
  std::vector<std::uint32_t> sequence;
  std::vector<memshuffle::detail::window> windows;

  rolling(heap& h, const std::vector<std::byte*>& old, std::size_t bytes) {
    for (std::byte* p : old) {
      const std::uint32_t a = h.arena_number(p);
      if (windows.empty() || windows.back().arena != a)
        windows.push_back({a, static_cast<std::uint32_t>(moves.size()), 0, 0});
      moves.push_back({p, nullptr, bytes, static_cast<std::uint32_t>(moves.size()), 3});
      windows.back().last = static_cast<std::uint32_t>(moves.size());
      windows.back().bytes += bytes;
    }
    sequence.resize(moves.size());
  }
  void begin(heap& h, layout_rng* rng = nullptr) {
    h.begin_shuffle(moves, windows, rng, sequence);
  }
  void run(heap& h, layout_rng* rng = nullptr) {
    begin(h, rng);
    h.run_moves(moves, sequence);
    h.end_shuffle();
  }
};

}  // namespace

TEST_CASE("arena_number names the arena an address lies in, with the index and without") {
  recording_resource up;
  heap h(&up, arena_size);
  std::vector<std::pair<std::byte*, std::size_t>> entries;
  for (std::size_t i = 0; i < 300; ++i) {
    const std::size_t bytes = 64 + (i % 5) * 200;
    entries.push_back({h.place(bytes, 8), bytes});
  }
  entries.push_back({h.place(3 * arena_size, 64), 3 * arena_size});  // spans several granules
  std::vector<std::uint32_t> searched;
  for (const auto& [p, bytes] : entries) searched.push_back(h.arena_number(p));  // no index yet
  h.index_arenas();
  for (std::size_t i = 0; i < entries.size(); ++i) {
    CAPTURE(i);
    const auto& [p, bytes] = entries[i];
    CHECK(searched[i] < h.arenas());
    CHECK(h.arena_number(p) == searched[i]);
    CHECK(h.arena_number(p + bytes - 1) == searched[i]);
  }
  CHECK(std::set(searched.begin(), searched.end()).size() == h.arenas());
}

TEST_CASE("a full shuffle reuses the arenas it empties, so the upstream lends one more at most") {
  recording_resource up;
  up.keep_freed(true);
  heap h(&up, arena_size);
  std::vector<std::byte*> old;
  while (h.arenas() < 8) old.push_back(h.place(64, 8));
  for (std::byte* p : old) std::memcpy(p, marker.data(), marker.size());
  const std::size_t arenas = h.arenas(), allocations = up.allocations();
  rolling r(h, old, 64);
  r.run(h);
  CHECK(up.allocations() <= allocations + 1);  // one fresh arena to start the chain
  CHECK(h.arenas() <= arenas);
  CHECK(h.reserved_bytes() == up.outstanding_bytes());
  for (const auto& m : r.moves) {
    CHECK(m.to != m.from);
    CHECK(aligned(m.to, 8));
    CHECK(std::memcmp(m.to, marker.data(), marker.size()) == 0);  // copied
  }
  std::vector<std::byte*> now;
  for (const auto& m : r.moves) now.push_back(m.to);
  std::sort(now.begin(), now.end());
  for (std::size_t i = 1; i < now.size(); ++i) CHECK(now[i] - now[i - 1] >= 64);  // no overlap
  // Every entry's bytes are where they went, and nowhere else the upstream holds.
  for (std::byte* p : now) std::memset(p, 0, 64);
  CHECK_FALSE(ever_held(up, marker));
}

TEST_CASE("a full shuffle that cannot get a fresh arena changes nothing") {
  recording_resource up;
  heap h(&up, arena_size);
  std::vector<std::byte*> old;
  while (h.arenas() < 3) old.push_back(h.place(64, 8));
  for (std::size_t i = 0; i < old.size(); ++i) std::memset(old[i], static_cast<int>(i), 64);
  const std::size_t reserved = h.reserved_bytes(), arenas = h.arenas();
  rolling r(h, old, 64);
  up.fail_after(0);
  CHECK_THROWS_AS(r.begin(h), std::bad_alloc);
  up.fail_never();
  CHECK(h.reserved_bytes() == reserved);
  CHECK(h.arenas() == arenas);
  CHECK(up.outstanding() == arenas);
  for (std::size_t i = 0; i < old.size(); ++i) CHECK(std::to_integer<int>(old[i][63]) == static_cast<int>(i % 256));
  r.run(h);  // and it can still run in full
  for (const auto& m : r.moves) CHECK(m.to != m.from);
}

namespace {

// One entry of the scattering test: where it lies, its size, and its arena's serial.
struct placed {
  std::byte* p;
  std::size_t bytes;
  std::uint32_t align_log2;
  std::uint64_t arena;
};

// A full shuffle of every entry (given in any order); returns them where they went, in
// the same order. With rng the layout is drawn at random.
std::vector<placed> shuffle_all(heap& h, std::vector<placed> entries, layout_rng* rng) {
  std::vector<std::uint32_t> by_address(entries.size());
  for (std::uint32_t i = 0; i < by_address.size(); ++i) by_address[i] = i;
  std::sort(by_address.begin(), by_address.end(), [&](auto x, auto y) { return entries[x].p < entries[y].p; });
  std::vector<memshuffle::detail::move> moves;
  std::vector<memshuffle::detail::window> windows;
  h.index_arenas();
  for (std::uint32_t i : by_address) {
    const std::uint32_t a = h.arena_number(entries[i].p);
    const auto k = static_cast<std::uint32_t>(moves.size());
    if (windows.empty() || windows.back().arena != a) windows.push_back({a, k, k, 0});
    moves.push_back({entries[i].p, nullptr, entries[i].bytes, i, entries[i].align_log2});
    ++windows.back().last;
    windows.back().bytes += entries[i].bytes;
  }
  std::vector<std::uint32_t> sequence(moves.size());
  h.begin_shuffle(moves, windows, rng, sequence);
  h.run_moves(moves, sequence);
  h.end_shuffle();
  for (const auto& m : moves) {
    CHECK(m.to != m.from);
    entries[m.slot].p = m.to;
  }
  for (placed& e : entries) e.arena = h.serial_of(e.p);
  return entries;
}

// Of the pairs of entries that shared an arena before, the share that share one after,
// over what uniform random placement into the arenas as filled after gives.
double kept_together_over_uniform(const std::vector<placed>& before, const std::vector<placed>& after) {
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::size_t> both;
  std::map<std::uint64_t, std::size_t> was, is;
  for (std::size_t i = 0; i < before.size(); ++i) {
    ++both[{before[i].arena, after[i].arena}];
    ++was[before[i].arena];
    ++is[after[i].arena];
  }
  const auto pairs = [](std::size_t c) { return static_cast<double>(c) * static_cast<double>(c - 1) / 2; };
  double kept = 0, shared = 0, uniform = 0;
  for (const auto& [key, c] : both) kept += pairs(c);
  for (const auto& [key, c] : was) shared += pairs(c);
  for (const auto& [key, c] : is) uniform += pairs(c);
  uniform /= pairs(before.size());
  return kept / shared / uniform;
}

}  // namespace

namespace {
bool filled_with(const std::byte* p, std::size_t bytes, std::byte b) {
  return std::all_of(p, p + bytes, [b](std::byte x) { return x == b; });
}
}  // namespace

TEST_CASE("a shuffle in parts keeps in place the entries pinned when their turn comes, and entries placed meanwhile") {
  for (const bool random : {false, true}) {
    CAPTURE(random);
    recording_resource up;
    heap h(&up, arena_size);
    std::vector<std::byte*> old;
    for (int i = 0; i < 400; ++i) {
      old.push_back(h.place(64, 8));
      std::memset(old.back(), i % 251, 64);
    }
    h.index_arenas();
    rolling r(h, old, 64);
    h.hold();
    layout_rng rng(5);
    h.begin_shuffle(r.moves, r.windows, random ? &rng : nullptr);
    // Every seventh entry is pinned when its turn comes; entries are placed between parts.
    const memshuffle::detail::keep_test every_seventh{
        nullptr, [](const void*, const memshuffle::detail::move& m) noexcept { return m.slot % 7 == 0; }};
    std::vector<std::byte*> meanwhile;
    std::vector<std::uint32_t> part(16);
    while (const std::size_t n = h.plan_part(r.moves, r.windows, random ? &rng : nullptr, every_seventh, part)) {
      h.run_moves(r.moves, std::span(part).first(n));
      meanwhile.push_back(h.place(100, 8));
      std::memset(meanwhile.back(), 0xAB, 100);
    }
    h.end_shuffle(r.moves);
    std::size_t kept = 0;
    for (const auto& m : r.moves) {
      CAPTURE(m.slot);
      const bool pinned = m.slot % 7 == 0;
      CHECK((m.to == nullptr) == pinned);
      const std::byte* at = pinned ? m.from : m.to;
      CHECK(filled_with(at, 64, std::byte(static_cast<unsigned char>(m.slot % 251))));
      kept += pinned;
    }
    CHECK(kept == (400 + 6) / 7);
    for (const std::byte* p : meanwhile) CHECK(filled_with(p, 100, std::byte{0xAB}));
    CHECK(h.reserved_bytes() == up.outstanding_bytes());
    // The books agree: vacating every entry gives every arena back (but the one being
    // filled, rewound).
    for (const auto& m : r.moves) h.vacate(m.to != nullptr ? m.to : m.from, 64);
    for (std::byte* p : meanwhile) h.vacate(p, 100);
    CHECK(h.arenas() <= 1);
  }
}

namespace {

// Pins some entries of old (by index) when their turn comes in a shuffle in parts.
struct pinned_set {
  std::set<std::uint32_t> slots;
  memshuffle::detail::keep_test test() const {
    return {this, [](const void* self, const memshuffle::detail::move& m) noexcept {
              return static_cast<const pinned_set*>(self)->slots.count(m.slot) != 0;
            }};
  }
};

// A shuffle in parts of 64 moves over the entries of r, those in pinned kept in place.
void run_in_parts(heap& h, rolling& r, const pinned_set& pinned, layout_rng* rng) {
  h.index_arenas();
  h.hold();
  h.begin_shuffle(r.moves, r.windows, rng);
  std::vector<std::uint32_t> part(64);
  while (const std::size_t n = h.plan_part(r.moves, r.windows, rng, pinned.test(), part))
    h.run_moves(r.moves, std::span(part).first(n));
  h.end_shuffle(r.moves);
}

}  // namespace

TEST_CASE("an entry pinned at its turn stays where it is, and what left the arenas around it is wiped") {
  for (const bool random : {false, true}) {
    CAPTURE(random);
    recording_resource up;
    up.keep_freed(true);
    heap h(&up, arena_size);
    std::vector<std::byte*> old;
    while (h.arenas() < 3) old.push_back(h.place(64, 8));
    const auto last_arena = static_cast<std::uint32_t>(old.size() - 1);
    for (int i = 0; i < 3; ++i) old.push_back(h.place(64, 8));
    for (std::size_t i = 0; i < old.size(); ++i) std::memset(old[i], static_cast<int>(1 + i % 251), 64);
    // Pinned: the front of a full arena (a destination, whose writes pass over it) and
    // the first entry of the last, nearly empty one (drained but for it). The entry
    // after each carries the marker, which must not outlive its move.
    pinned_set pinned;
    pinned.slots = {0, last_arena};
    std::memcpy(old[1], marker.data(), marker.size());
    std::memcpy(old[last_arena + 1], marker.data(), marker.size());
    const std::size_t allocations = up.allocations();
    rolling r(h, old, 64);
    layout_rng rng(7);
    run_in_parts(h, r, pinned, random ? &rng : nullptr);
    CHECK(up.allocations() <= allocations + 1);
    for (const auto& m : r.moves) {
      CAPTURE(m.slot);
      const bool kept = pinned.slots.count(m.slot) != 0;
      CHECK((m.to == nullptr) == kept);
      const std::byte* at = kept ? m.from : m.to;
      if (m.slot == 1 || m.slot == last_arena + 1)
        CHECK(std::memcmp(at, marker.data(), marker.size()) == 0);
      else
        CHECK(filled_with(at, 64, std::byte(static_cast<unsigned char>(1 + m.slot % 251))));
    }
    for (const auto& m : r.moves)
      if (m.to != nullptr) std::memset(m.to, 0, m.bytes);  // the copies do not count
    CHECK_FALSE(ever_held(up, marker));
    // The drained arena counts the one entry left: vacating it gives the arena back.
    const auto released = h.arenas_released();
    h.vacate(old[last_arena], 64);
    CHECK(h.arenas_released() == released + 1);
    // And the books agree on the rest: vacating every entry gives every arena back (but
    // the one being filled, rewound).
    for (const auto& m : r.moves)
      if (m.slot != last_arena) h.vacate(m.to != nullptr ? m.to : m.from, 64);
    CHECK(h.arenas() <= 1);
  }
}

TEST_CASE("entries pinned when their turn comes cost the shuffle no arena: the writes pass over them") {
  for (const std::size_t bytes : {std::size_t{64}, std::size_t{4096}}) {
    for (const bool random : {false, true}) {
      CAPTURE(bytes);
      CAPTURE(random);
      memshuffle::tracking_resource up;
      heap h(&up, bytes == 64 ? arena_size : 16 * arena_size);  // 64 or 16 entries an arena
      std::vector<std::byte*> old;
      while (h.arenas() < 40) {
        old.push_back(h.place(bytes, 8));
        std::memset(old.back(), static_cast<int>(old.size() % 251), bytes);
      }
      const std::size_t held = up.stats().current_bytes, one_arena = held / h.arenas();
      // One entry near the front of every fourth arena: most arenas are destinations,
      // whose room used to end below such an entry.
      const std::size_t per_arena = old.size() / 39;
      pinned_set pinned;
      for (std::size_t a = 0; a < 40; a += 4) pinned.slots.insert(static_cast<std::uint32_t>(a * per_arena + 1));
      rolling r(h, old, bytes);
      layout_rng rng(11);
      run_in_parts(h, r, pinned, random ? &rng : nullptr);
      // Kept whole, the ten pinned entries' arenas would need ten more.
      CHECK(up.stats().peak_bytes <= held + 2 * one_arena);
      CHECK(h.reserved_bytes() == up.stats().current_bytes);
      for (const auto& m : r.moves) {
        CAPTURE(m.slot);
        const bool kept = pinned.slots.count(m.slot) != 0;
        CHECK((m.to == nullptr) == kept);
        CHECK(filled_with(kept ? m.from : m.to, bytes, std::byte(static_cast<unsigned char>((m.slot + 1) % 251))));
      }
    }
  }
}

TEST_CASE("the bytes a destination's writes pass over below a pinned entry are wiped") {
  for (const bool random : {false, true}) {
    CAPTURE(random);
    recording_resource up;
    up.keep_freed(true);
    heap h(&up, arena_size);
    // Mixed sizes: a write that does not fit below a pinned entry leaves a gap there.
    std::vector<std::byte*> old;
    std::vector<std::size_t> sizes;
    while (h.arenas() < 12) {
      sizes.push_back(std::size_t{40} + 24 * (old.size() % 7));
      old.push_back(h.place(sizes.back(), 8));
      std::memset(old.back(), 0, sizes.back());
      std::memcpy(old.back(), marker.data(), marker.size());
    }
    rolling r(h, old, 0);
    for (auto& m : r.moves) {
      m.bytes = sizes[m.slot];
    }
    for (auto& w : r.windows) {
      w.bytes = 0;
      for (std::uint32_t k = w.first; k < w.last; ++k) w.bytes += r.moves[k].bytes;
    }
    pinned_set pinned;
    for (std::uint32_t i = 3; i < old.size(); i += 9) pinned.slots.insert(i);
    layout_rng rng(3);
    run_in_parts(h, r, pinned, random ? &rng : nullptr);
    for (const auto& m : r.moves) std::memset(m.to != nullptr ? m.to : m.from, 0, m.bytes);
    CHECK_FALSE(ever_held(up, marker));
  }
}

TEST_CASE("a random full shuffle scatters the entries of an arena as uniform placement would") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 sizes(seed);
  layout_rng rng(seed);
  for (const bool mixed : {false, true}) {
    CAPTURE(mixed);
    recording_resource up;
    heap h(&up, 4 * arena_size);  // 256 entries of 64 bytes an arena
    std::vector<placed> entries;
    while (h.arenas() < 64) {
      const std::size_t bytes = mixed ? 8 * (2 + sizes() % 24) : 64;
      const std::uint32_t align_log2 = mixed && sizes() % 8 == 0 ? 4 : 3;
      entries.push_back({h.place(bytes, std::size_t{1} << align_log2), bytes, align_log2, 0});
    }
    for (placed& e : entries) e.arena = h.serial_of(e.p);
    const std::size_t arenas = h.arenas(), allocations = up.allocations();
    for (int round = 0; round < 3; ++round) {
      CAPTURE(round);
      std::vector<placed> after = shuffle_all(h, entries, &rng);
      const double ratio = kept_together_over_uniform(entries, after);
      MESSAGE("mixed sizes: ", mixed, ", shuffle ", round, ": pairs kept together / uniform placement = ", ratio);
      CHECK(ratio >= 0.9);
      CHECK(ratio <= 1.1);
      CHECK(h.arenas() <= arenas + 1);
      entries = std::move(after);
    }
    CHECK(up.allocations() <= allocations + 3 * 2);  // an arena or two from the upstream per shuffle
    // Read in order, one arena after the other, the same heap keeps its arenas together:
    // the statistic sees that.
    const std::vector<placed> in_order = shuffle_all(h, entries, nullptr);
    const double ratio = kept_together_over_uniform(entries, in_order);
    MESSAGE("mixed sizes: ", mixed, ", in order: pairs kept together / uniform placement = ", ratio);
    CHECK(ratio > 5);
  }
}

#ifdef MEMSHUFFLE_ASAN
TEST_CASE("vacated bytes are poisoned under the address sanitizer") {
  recording_resource up;
  heap h(&up, arena_size);
  std::byte* a = h.place(64, 8);
  h.place(64, 8);  // keeps the arena alive
  CHECK_FALSE(__asan_address_is_poisoned(a));
  h.vacate(a, 64);
  CHECK(__asan_address_is_poisoned(a));
  CHECK(__asan_address_is_poisoned(a + 63));
}
#endif

TEST_CASE("nothing is left upstream after the heap ends, and every chunk was wiped") {
  recording_resource up;
  up.keep_freed(true);
  {
    heap h(&up, arena_size);
    for (int i = 0; i < 100; ++i) std::memcpy(h.place(64, 8), marker.data(), marker.size());
  }
  CHECK(up.outstanding() == 0);
  CHECK(up.mismatches() == 0);
  CHECK_FALSE(ever_held(up, marker));
}

}  // TEST_SUITE

