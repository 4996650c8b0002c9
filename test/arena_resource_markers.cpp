// arena_resource's markers: mark(), rewind() and arena_scope, and which markers a
// rewind, a reset or a popped block makes stale.
#include <memshuffle/arena_resource.hpp>

#include <doctest/doctest.h>

#include "test/support/arena_stats_same.hpp"
#include "test/support/recording_resource.hpp"
#include "test/support/seed.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

using memshuffle::arena_marker;
using memshuffle::arena_options;
using memshuffle::arena_resource;
using memshuffle::arena_scope;
using memshuffle::testing::recording_resource;
using memshuffle::testing::same;

namespace {

std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// A rewind that must be refused: it throws std::invalid_argument and the arena is as
// before (same statistics, the next allocation lands where it would have). The probe
// allocations are undone by a rewind to a fresh marker, which moves nothing.
void check_refused(arena_resource& arena, const arena_marker& m) {
  const arena_marker here = arena.mark();
  void* next = arena.allocate(8, 8);
  arena.rewind(here);
  const auto before = arena.stats();
  CHECK_THROWS_AS(arena.rewind(m), std::invalid_argument);
  CHECK(same(arena.stats(), before));
  CHECK(arena.allocate(8, 8) == next);
  arena.rewind(here);
}

bool overlap(const void* a, std::size_t na, const void* b, std::size_t nb) {
  return addr(a) < addr(b) + nb && addr(b) < addr(a) + na;
}

}  // namespace

TEST_SUITE("arena_resource") {

TEST_CASE("rewind frees what came after the marker and reuses its chunks") {
  recording_resource up;
  arena_resource arena(std::size_t{256}, &up);
  (void)arena.allocate(40, 8);
  const auto at_mark = arena.stats();
  const arena_marker m = arena.mark();
  std::vector<void*> first;
  for (int i = 0; i < 500; ++i) first.push_back(arena.allocate(24 + i % 40, 8));
  const auto reserved = arena.stats().bytes_reserved;
  const auto calls = up.allocations();
  CHECK(calls > 3);  // the run spans several chunks
  for (int round = 0; round < 3; ++round) {
    arena.rewind(m);
    CHECK(arena.stats().bytes_used == at_mark.bytes_used);
    CHECK(arena.stats().allocations == at_mark.allocations);
    std::vector<void*> again;
    for (int i = 0; i < 500; ++i) again.push_back(arena.allocate(24 + i % 40, 8));
    CHECK(again == first);
  }
  CHECK(arena.stats().bytes_reserved == reserved);
  CHECK(up.allocations() == calls);
}

TEST_CASE("a marker from another arena or taken before a reset is refused and changes nothing") {
  recording_resource up;
  arena_resource arena(arena_options{.reuse_last_block = true}, &up), other(&up);
  const arena_marker foreign = other.mark();
  const arena_marker old = arena.mark();
  (void)arena.allocate(100, 8);
  arena.reset();
  (void)arena.allocate(50, 8);
  const auto before = arena.stats();
  void* next = arena.allocate(8, 8);
  arena.deallocate(next, 8, 8);
  CHECK_THROWS_AS(arena.rewind(foreign), std::invalid_argument);
  CHECK_THROWS_AS(arena.rewind(old), std::invalid_argument);
  const arena_marker later = arena.mark();
  (void)arena.allocate(8, 8);
  arena.rewind(arena.mark());  // rewinding to here is fine
  const arena_marker earlier = arena.mark();
  arena.rewind(later);
  CHECK_THROWS_AS(arena.rewind(earlier), std::invalid_argument);  // ahead of the position
  CHECK(same(arena.stats(), before));
  CHECK(arena.allocate(8, 8) == next);
}

TEST_CASE("a marker left behind by a rewind to an earlier one stays stale after the arena grows past it") {
  recording_resource up;
  arena_resource arena(&up);
  const arena_marker m1 = arena.mark();
  (void)arena.allocate(32, 8);
  const arena_marker m2 = arena.mark();
  arena.rewind(m1);
  void* live = arena.allocate(128, 8);  // past m2's position
  std::memset(live, 0x5a, 128);
  check_refused(arena, m2);
  void* next = arena.allocate(64, 8);
  CHECK_FALSE(overlap(next, 64, live, 128));
  CHECK(std::all_of(static_cast<unsigned char*>(live), static_cast<unsigned char*>(live) + 128,
                    [](unsigned char c) { return c == 0x5a; }));
  arena.rewind(m1);  // the earlier marker is still good
  CHECK(arena.stats().bytes_used == 0);
}

TEST_CASE("a marker taken after a block is stale once that block is popped, even after regrowth") {
  recording_resource up;
  arena_resource arena(arena_options{.reuse_last_block = true}, &up);
  (void)arena.allocate(16, 8);
  const arena_marker before_b = arena.mark();
  void* b = arena.allocate(48, 8);
  const arena_marker after_b = arena.mark();
  arena.deallocate(b, 48, 8);  // the most recent block: its bytes come back
  CHECK(arena.stats().bytes_used == 16);
  void* live = arena.allocate(200, 8);  // past after_b's position
  std::memset(live, 0x33, 200);
  check_refused(arena, after_b);
  CHECK_FALSE(overlap(arena.allocate(64, 8), 64, live, 200));
  arena.rewind(before_b);  // taken before the popped block: still good
  CHECK(arena.stats().bytes_used == 16);
  CHECK(arena.stats().allocations == 1);
}

TEST_CASE("a rewind makes the markers taken after its marker stale, even at the same position") {
  recording_resource up;
  arena_resource arena(&up);
  (void)arena.allocate(8, 8);
  const arena_marker m1 = arena.mark();
  const arena_marker m2 = arena.mark();
  arena.rewind(m1);
  check_refused(arena, m2);
  arena.rewind(m1);  // again: fine
  (void)arena.allocate(8, 8);
  arena.rewind(m1);
  CHECK(arena.stats().bytes_used == 8);
}

TEST_CASE("nested markers rewind inner first, then outer, and loops of scopes keep the outer one") {
  recording_resource up;
  arena_resource arena(std::size_t{512}, &up);
  (void)arena.allocate(24, 8);
  const arena_marker outer = arena.mark();
  const arena_marker inner = arena.mark();
  (void)arena.allocate(40, 8);
  arena.rewind(inner);
  arena.rewind(outer);
  CHECK(arena.stats().bytes_used == 24);

  // Thousands of scopes, well beyond what the arena keeps of its history: a loop of
  // scopes, scopes nested at the same position, and scopes after kept blocks.
  {
    arena_scope whole(arena);
    std::size_t kept = 0;
    for (int i = 0; i < 3000; ++i) {
      CAPTURE(i);
      if (i % 3 == 2) {
        (void)arena.allocate(8, 8);
        kept += 8;
      }
      const std::size_t at_start = arena.stats().bytes_used;
      {
        arena_scope iteration(arena);
        (void)arena.allocate(16, 8);
        if (i % 2 == 0) {
          arena_scope nested(arena);  // at the same position as `iteration` when i % 3 == 0
          (void)arena.allocate(32, 8);
        }
        (void)arena.allocate(16, 8);
      }
      REQUIRE(arena.stats().bytes_used == at_start);
    }
    CHECK(arena.stats().bytes_used == 24 + kept);
  }
  CHECK(arena.stats().bytes_used == 24);
  arena.rewind(outer);
  CHECK(arena.stats().bytes_used == 24);
}

TEST_CASE("markers work across chunk boundaries, and a stale one stays stale when a chunk is reused") {
  recording_resource up;
  arena_resource arena(std::size_t{128}, &up);
  (void)arena.allocate(64, 8);
  const arena_marker in_first = arena.mark();
  std::vector<void*> blocks;
  for (int i = 0; i < 20; ++i) blocks.push_back(arena.allocate(100, 8));  // several chunks
  REQUIRE(up.allocations() >= 3);
  const arena_marker later = arena.mark();
  const auto at_later = arena.stats();
  (void)arena.allocate(100, 8);
  arena.rewind(later);  // back within a later chunk
  CHECK(arena.stats().bytes_used == at_later.bytes_used);
  arena.rewind(in_first);  // back to the first chunk
  CHECK(arena.stats().bytes_used == 64);
  for (int i = 0; i < 20; ++i) CHECK(arena.allocate(100, 8) == blocks[static_cast<std::size_t>(i)]);
  void* live = arena.allocate(100, 8);  // the arena is past `later` again
  check_refused(arena, later);
  CHECK_FALSE(overlap(arena.allocate(100, 8), 100, live, 100));

  // Rewound before the chunk, which is then given back and may be handed out again
  // at the same address: the marker into it stays stale.
  arena.rewind(in_first);
  const arena_marker into_spare = [&] {
    for (int i = 0; i < 20; ++i) (void)arena.allocate(100, 8);
    return arena.mark();
  }();
  arena.rewind(in_first);
  arena.trim();
  for (int i = 0; i < 25; ++i) (void)arena.allocate(100, 8);
  check_refused(arena, into_spare);
}

TEST_CASE("beyond what the arena keeps of its history, stale markers are still refused") {
  recording_resource up;
  arena_resource arena(std::size_t{1024}, &up);
  const arena_marker whole = arena.mark();
  std::vector<arena_marker> kept, dropped;
  for (int round = 0; round < 200; ++round) {  // each rewind lands above the last one
    (void)arena.allocate(8, 8);
    kept.push_back(arena.mark());
    (void)arena.allocate(16, 8);
    dropped.push_back(arena.mark());
    (void)arena.allocate(16, 8);
    arena.rewind(kept.back());
  }
  const auto used = arena.stats().bytes_used;
  for (const auto& m : dropped) check_refused(arena, m);
  CHECK(arena.stats().bytes_used == used);
  arena.rewind(kept.back());
  arena.rewind(whole);
  CHECK(arena.stats().bytes_used == 0);
}

TEST_CASE("rewind agrees with a model of which markers are stale, and blocks never overlap") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  recording_resource up;
  // Small chunks: markers across boundaries.
  arena_resource arena(arena_options{.initial_size = 256, .reuse_last_block = true}, &up);
  struct block {
    unsigned char* p;
    std::size_t bytes;
    std::uint64_t sequence;
  };
  struct marker {
    arena_marker m;
    std::uint64_t sequence;  // allocations before it
    unsigned char* top;      // the arena's position when taken
    bool valid;
  };
  std::vector<block> live;
  std::vector<marker> markers;
  std::uint64_t sequence = 0;
  unsigned char* top = nullptr;
  const auto holds = [](const block& b) {
    return std::all_of(b.p, b.p + b.bytes,
                       [&](unsigned char c) { return c == static_cast<unsigned char>(b.sequence); });
  };
  const auto allocate = [&] {
    const std::size_t bytes = rng() % 8 == 0 ? rng() % 600 : rng() % 64;
    const std::size_t alignment = std::size_t{1} << (rng() % 6);
    auto* p = static_cast<unsigned char*>(arena.allocate(bytes, alignment));
    for (const auto& b : live)
      REQUIRE_FALSE(overlap(p, std::max<std::size_t>(bytes, 1), b.p, std::max<std::size_t>(b.bytes, 1)));
    live.push_back({p, bytes, sequence++});
    std::memset(p, static_cast<unsigned char>(live.back().sequence), bytes);
    top = p + std::max<std::size_t>(bytes, 1);
  };
  const auto forget_from = [&](std::uint64_t s) {
    std::erase_if(live, [&](const block& b) { return b.sequence >= s; });
  };
  for (int step = 0; step < 4000; ++step) {
    CAPTURE(step);
    switch (rng() % 8) {
      case 0: case 1: case 2: allocate(); break;
      case 3:  // deallocate the most recent live block; a pop when it ends at the position
        if (!live.empty()) {
          const block b = live.back();
          live.pop_back();
          arena.deallocate(b.p, b.bytes, 1);
          if (b.p + std::max<std::size_t>(b.bytes, 1) == top) {
            top = b.p;
            for (auto& m : markers) m.valid = m.valid && m.sequence <= b.sequence;
          }
        }
        break;
      case 4: markers.push_back({arena.mark(), sequence, top, true}); break;
      case 5:
        if (!markers.empty()) {
          const std::size_t i = rng() % markers.size();
          const marker m = markers[i];
          CAPTURE(i);
          CAPTURE(m.valid);
          if (!m.valid) {
            check_refused(arena, m.m);
            break;
          }
          arena.rewind(m.m);
          forget_from(m.sequence);
          top = m.top;
          for (std::size_t j = i + 1; j < markers.size(); ++j) markers[j].valid = false;
        }
        break;
      case 6: {  // a scope with a few blocks
        const std::uint64_t first = sequence;
        unsigned char* const at = top;
        {
          arena_scope scope(arena);
          for (auto n = rng() % 4; n > 0; --n) allocate();
        }
        forget_from(first);
        top = at;
        break;
      }
      default:
        if (rng() % 64 == 0) {
          arena.reset();
          live.clear();
          markers.clear();
          top = nullptr;
        }
    }
    if (step % 64 == 0) REQUIRE(std::all_of(live.begin(), live.end(), holds));
  }
  CHECK(std::all_of(live.begin(), live.end(), holds));
}

TEST_CASE("arena_scope rewinds when it ends, nested scopes too") {
  recording_resource up;
  arena_resource arena(std::size_t{512}, &up);
  void* base = arena.allocate(16, 8);
  void* outer_first = nullptr;
  {
    arena_scope outer(arena);
    outer_first = arena.allocate(16, 8);
    {
      arena_scope inner(arena);
      for (int i = 0; i < 200; ++i) (void)arena.allocate(64, 8);
    }
    CHECK(arena.stats().allocations == 2);
    CHECK(arena.allocate(16, 8) != outer_first);
  }
  CHECK(arena.stats().allocations == 1);
  CHECK(arena.stats().bytes_used == 16);
  CHECK(arena.allocate(16, 8) == outer_first);
  CHECK(base != outer_first);
}

TEST_CASE("an arena_scope ended after a reset leaves the arena alone") {
  recording_resource up;
  arena_resource arena(&up);
  {
    arena_scope scope(arena);
    (void)arena.allocate(64, 8);
    arena.reset();
    (void)arena.allocate(32, 8);
  }
  CHECK(arena.stats().bytes_used == 32);
  CHECK(arena.stats().allocations == 1);
}

}  // TEST_SUITE
