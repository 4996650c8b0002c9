// The arena's extensions beyond monotonic_buffer_resource, each off by default:
// reuse of the last block, wiping what was handed out, and a retention cap and a
// retention policy from recent units for reset().
#include <memshuffle/arena_resource.hpp>

#include <doctest/doctest.h>

#include "test/support/recording_resource.hpp"
#include "test/support/seed.hpp"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <random>
#include <span>
#include <vector>

using memshuffle::arena_options;
using memshuffle::arena_resource;
using memshuffle::arena_scope;
using memshuffle::testing::recording_resource;

namespace {

// A run of the pattern the blocks are filled with; no chunk header or stray byte holds it.
const std::vector<std::byte> secret(16, std::byte{0xA5});

// Fills n bytes from the arena with the secret pattern.
void* secret_block(arena_resource& arena, std::size_t n) {
  void* p = arena.allocate(n, 8);
  std::memset(p, 0xA5, n);
  return p;
}

bool all_zero(const void* p, std::size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  return std::all_of(b, b + n, [](std::byte x) { return x == std::byte{0}; });
}

}  // namespace

TEST_SUITE("arena_resource") {

TEST_CASE("with wipe, reset zeroes every byte handed out, across chunks") {
  recording_resource up;
  up.keep_freed(true);
  arena_resource arena(arena_options{.initial_size = 256, .wipe = true}, &up);
  std::vector<std::pair<void*, std::size_t>> blocks;
  for (int i = 0; i < 40; ++i) blocks.emplace_back(secret_block(arena, 100), 100);
  arena.reset();
  for (auto& [p, n] : blocks) CHECK(all_zero(p, n));
  CHECK_FALSE(up.contains(secret));
}

TEST_CASE("with wipe, release and destruction leave no handed-out byte upstream") {
  recording_resource up;
  up.keep_freed(true);  // freed blocks stay readable for the scan
  {
    arena_resource arena(arena_options{.initial_size = 64, .wipe = true}, &up);
    for (int i = 0; i < 20; ++i) (void)secret_block(arena, 48);
    arena.release();
    CHECK(up.outstanding() == 0);
    CHECK_FALSE(up.contains(secret));
    for (int i = 0; i < 20; ++i) (void)secret_block(arena, 48);
  }
  CHECK_FALSE(up.contains(secret));
}

TEST_CASE("with wipe, a rewind and the end of a scope zero what came after the mark, nothing before") {
  recording_resource up;
  arena_resource arena(arena_options{.initial_size = 128, .wipe = true}, &up);
  void* kept = secret_block(arena, 40);
  std::vector<void*> later;
  {
    arena_scope scope(arena);
    for (int i = 0; i < 10; ++i) later.push_back(secret_block(arena, 60));
  }
  for (void* p : later) CHECK(all_zero(p, 60));
  CHECK_FALSE(all_zero(kept, 40));
  const auto m = arena.mark();
  void* after = secret_block(arena, 300);
  arena.rewind(m);
  CHECK(all_zero(after, 300));
  CHECK_FALSE(all_zero(kept, 40));
}

TEST_CASE("with wipe and reuse_last_block, a block given back is zeroed before it is reused") {
  recording_resource up;
  arena_resource arena(arena_options{.reuse_last_block = true, .wipe = true}, &up);
  void* p = secret_block(arena, 32);
  arena.deallocate(p, 32, 8);
  CHECK(all_zero(p, 32));
  CHECK(arena.allocate(32, 8) == p);
}

TEST_CASE("without wipe, reset leaves the bytes as they were") {
  recording_resource up;
  arena_resource arena(&up);
  void* p = secret_block(arena, 32);
  arena.reset();
  CHECK_FALSE(all_zero(p, 32));
}

TEST_CASE("reset with a retention cap keeps at most the cap, the largest chunks first") {
  recording_resource up;
  const std::size_t cap = 8192;
  arena_resource arena(arena_options{.initial_size = 512, .reset_retention = cap}, &up);
  for (int i = 0; i < 200; ++i) (void)arena.allocate(200, 8);  // about 40 KiB of chunks
  const auto grown = arena.stats().bytes_reserved;
  CHECK(grown > cap);
  arena.reset();
  const auto kept = arena.stats();
  CHECK(kept.bytes_reserved <= cap);
  CHECK(kept.bytes_reserved > cap / 2);  // the largest that fit, not the first ones
  CHECK(up.outstanding_bytes() == kept.bytes_reserved);
  // The kept chunks are reused before anything new is asked for.
  const auto calls = up.allocations();
  for (int i = 0; i < 10; ++i) (void)arena.allocate(200, 8);
  CHECK(up.allocations() == calls);
}

TEST_CASE("a retention cap bounds what a reset arena holds over heavy-tailed units of work") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  std::lognormal_distribution<double> unit_size(9.0, 1.5);  // median 8 KiB, long tail
  recording_resource up;
  const std::size_t cap = 64 * 1024;
  arena_resource arena(arena_options{.reset_retention = cap}, &up);
  for (int unit = 0; unit < 1000; ++unit) {
    auto left = static_cast<std::size_t>(std::min(unit_size(rng), 4e6));
    while (left > 0) {
      const std::size_t n = std::min<std::size_t>(left, 1 + rng() % 512);
      (void)arena.allocate(n, 8);
      left -= n;
    }
    arena.reset();
    REQUIRE(arena.stats().bytes_reserved <= cap);
  }
  CHECK(up.outstanding_bytes() <= cap);
}

// A unit of work: `count` blocks of `size` bytes, then a reset.
void run_unit(arena_resource& arena, int count, std::size_t size) {
  for (int i = 0; i < count; ++i) (void)arena.allocate(size, 8);
  arena.reset();
}

TEST_CASE("with a retention window, a burst's chunks go back once the burst has left the window") {
  recording_resource up;
  arena_resource arena(arena_options{.initial_size = 512, .retention_window = 4}, &up);
  run_unit(arena, 400, 100);  // about 40 KiB
  const auto after_burst = arena.stats().bytes_reserved;
  CHECK(after_burst > 32 * 1024);
  CHECK(after_burst <= arena.stats().retention_limit);
  for (int unit = 0; unit < 3; ++unit) {
    run_unit(arena, 10, 100);  // 1000 bytes
    CHECK(arena.stats().bytes_reserved == after_burst);  // the burst is still in the window
  }
  run_unit(arena, 10, 100);
  const auto st = arena.stats();
  CHECK(st.retention_limit < 4 * 1024);
  CHECK(st.bytes_reserved <= st.retention_limit);
  CHECK(up.outstanding_bytes() == st.bytes_reserved);
}

TEST_CASE("with a retention window, like units stop calling the upstream") {
  recording_resource up;
  arena_resource arena(arena_options{.initial_size = 256, .retention_window = 8}, &up);
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  std::vector<std::size_t> sizes(300);
  for (auto& n : sizes) n = 8 + rng() % 249;
  const auto unit = [&] {
    for (std::size_t n : sizes) (void)arena.allocate(n, 8);
    arena.reset();
  };
  unit();
  unit();
  const auto calls = up.allocations();
  for (int i = 0; i < 20; ++i) unit();
  CHECK(up.allocations() == calls);
}

TEST_CASE("a retention window and a cap: the smaller limit holds") {
  recording_resource up;
  const std::size_t cap = 8192;
  arena_resource arena(arena_options{.initial_size = 512, .reset_retention = cap, .retention_window = 2}, &up);
  run_unit(arena, 400, 100);
  CHECK(arena.stats().retention_limit == cap);
  CHECK(arena.stats().bytes_reserved <= cap);
  run_unit(arena, 5, 100);
  run_unit(arena, 5, 100);
  CHECK(arena.stats().retention_limit < cap);
  CHECK(arena.stats().bytes_reserved <= arena.stats().retention_limit);
}

TEST_CASE("a retention window above the maximum is refused, and release forgets the window") {
  recording_resource up;
  CHECK_THROWS_AS(arena_resource(arena_options{.retention_window = arena_options::max_retention_window + 1}, &up),
                  std::invalid_argument);
  arena_resource arena(arena_options{.retention_window = arena_options::max_retention_window}, &up);
  CHECK(arena.stats().retention_limit == std::numeric_limits<std::size_t>::max());
  run_unit(arena, 100, 100);
  CHECK(arena.stats().retention_limit < std::numeric_limits<std::size_t>::max());
  arena.release();
  CHECK(arena.stats().retention_limit == std::numeric_limits<std::size_t>::max());
}

TEST_CASE("without a retention cap, reset keeps everything") {
  recording_resource up;
  arena_resource arena(arena_options{.initial_size = 512}, &up);
  for (int i = 0; i < 200; ++i) (void)arena.allocate(200, 8);
  const auto grown = arena.stats().bytes_reserved;
  arena.reset();
  CHECK(arena.stats().bytes_reserved == grown);
}

}  // TEST_SUITE
