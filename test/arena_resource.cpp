// arena_resource: construction, options, alignment, growth, reset, stats, upstream
// failures and release. Markers, rewind and arena_scope: arena_resource_markers.cpp;
// the extensions that are off by default: arena_resource_options.cpp; the standard's
// wording and the side-by-side runs: arena_resource_std.cpp.
#include <memshuffle/arena_resource.hpp>
#include <memshuffle/error.hpp>

#include <doctest/doctest.h>

#include "test/support/arena_stats_same.hpp"
#include "test/support/page_aligned_resource.hpp"
#include "test/support/recording_resource.hpp"
#include "test/support/seed.hpp"
#include "test/support/upstream_checks.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <random>
#include <stdexcept>
#include <vector>

using memshuffle::arena_marker;
using memshuffle::arena_options;
using memshuffle::arena_resource;
using memshuffle::arena_scope;
using memshuffle::arena_stats;
using memshuffle::testing::check_upstream_clean;
using memshuffle::testing::same;
using memshuffle::testing::page_aligned_resource;
using memshuffle::testing::recording_resource;

namespace {

std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

struct request {
  std::size_t bytes;
  std::size_t alignment;
};

// Mostly small blocks, some large ones, alignments 1..4096.
std::vector<request> random_requests(std::uint64_t seed, std::size_t count) {
  std::mt19937_64 rng(seed);
  std::vector<request> out;
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t bytes = rng() % 16 == 0 ? rng() % 6000 : rng() % 300;
    const std::size_t alignment = std::size_t{1} << (rng() % 8 == 0 ? rng() % 13 : rng() % 5);
    out.push_back({bytes, alignment});
  }
  return out;
}

// Where an allocation landed: in the caller's buffer (block -1) or in the n-th block
// the upstream handed out, and at which offset.
struct placement {
  long block;
  std::ptrdiff_t offset;
  bool operator==(const placement&) const = default;
};

placement where(const recording_resource& up, const void* buffer, std::size_t buffer_size,
                const void* p, std::size_t bytes) {
  const std::size_t n = std::max<std::size_t>(bytes, 1);
  if (buffer != nullptr && addr(p) >= addr(buffer) && addr(p) + n <= addr(buffer) + buffer_size)
    return {-1, static_cast<std::ptrdiff_t>(addr(p) - addr(buffer))};
  const auto blocks = up.history();
  for (std::size_t i = blocks.size(); i-- > 0;)
    if (addr(p) >= addr(blocks[i].p) && addr(p) + n <= addr(blocks[i].p) + blocks[i].bytes)
      return {static_cast<long>(i), static_cast<std::ptrdiff_t>(addr(p) - addr(blocks[i].p))};
  return {-2, 0};  // nowhere: a bug
}

// Runs the requests (with a release() in the middle) and records where each landed.
template <class Resource>
std::vector<placement> run(Resource& r, const recording_resource& up, const void* buffer,
                           std::size_t buffer_size, const std::vector<request>& requests) {
  std::vector<placement> out;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    if (i == requests.size() / 2) r.release();
    void* p = r.allocate(requests[i].bytes, requests[i].alignment);
    out.push_back(where(up, buffer, buffer_size, p, requests[i].bytes));
  }
  return out;
}

std::vector<std::size_t> sizes_of(const recording_resource& up) {
  std::vector<std::size_t> out;
  for (auto& b : up.history()) out.push_back(b.bytes);
  return out;
}

// Installs a resource as the default for one scope.
struct default_resource_guard {
  std::pmr::memory_resource* previous;
  explicit default_resource_guard(std::pmr::memory_resource* r)
      : previous(std::pmr::set_default_resource(r)) {}
  ~default_resource_guard() { std::pmr::set_default_resource(previous); }
};

// Builds a std and an arena resource the same way (one of the six constructors),
// runs the same requests through both and compares everything the upstreams saw.
void check_parity(const std::function<std::unique_ptr<std::pmr::memory_resource>(
                      bool arena, void* buffer, std::size_t size, std::pmr::memory_resource* up)>& make,
                  std::size_t buffer_size) {
  MEMSHUFFLE_TEST_SEED(seed);
  auto requests = random_requests(seed, 3000);
  // Small first requests, before and after the release() in the middle: both must come
  // from the caller's buffer when there is one.
  requests.front() = requests[requests.size() / 2] = request{8, 8};
  alignas(4096) static std::byte buffer_std[4096], buffer_arena[4096];
  page_aligned_resource pages;
  recording_resource up_std(&pages), up_arena(&pages);
  std::vector<placement> std_layout, arena_layout;
  {
    default_resource_guard guard(&up_std);
    auto r = make(false, buffer_std, buffer_size, &up_std);
    std_layout = run(*static_cast<std::pmr::monotonic_buffer_resource*>(r.get()), up_std,
                     buffer_std, buffer_size, requests);
  }
  {
    default_resource_guard guard(&up_arena);
    auto r = make(true, buffer_arena, buffer_size, &up_arena);
    auto& arena = *static_cast<arena_resource*>(r.get());
    CHECK(arena.upstream_resource() == &up_arena);
    arena_layout = run(arena, up_arena, buffer_arena, buffer_size, requests);
  }
  CHECK(std::count(arena_layout.begin(), arena_layout.end(), placement{-2, 0}) == 0);
  CHECK(sizes_of(up_arena) == sizes_of(up_std));
  CHECK(arena_layout == std_layout);
  if (buffer_size >= 8) {
    CHECK(arena_layout.front().block == -1);
    CHECK(arena_layout[requests.size() / 2] == placement{-1, 0});
  }
  check_upstream_clean(up_arena);
}

template <class... Args>
std::unique_ptr<std::pmr::memory_resource> make_either(bool arena, Args... args) {
  if (arena) return std::make_unique<arena_resource>(args...);
  return std::make_unique<std::pmr::monotonic_buffer_resource>(args...);
}

// Every allocation lies in the buffer or a live upstream block, and none overlaps another.
struct layout_checker {
  explicit layout_checker(const recording_resource& u, const void* b = nullptr, std::size_t n = 0)
      : up(u), buffer(b), buffer_size(n) {}
  const recording_resource& up;
  const void* buffer;
  std::size_t buffer_size;
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> taken;

  bool inside(void* p, std::size_t n) const {
    if (buffer != nullptr && addr(p) >= addr(buffer) && addr(p) + n <= addr(buffer) + buffer_size)
      return true;
    for (auto& b : up.live_blocks())
      if (addr(p) >= addr(b.p) && addr(p) + n <= addr(b.p) + b.bytes) return true;
    return false;
  }
  void add(void* p, std::size_t bytes) {
    const std::size_t n = std::max<std::size_t>(bytes, 1);
    CHECK(inside(p, n));
    taken.emplace_back(addr(p), addr(p) + n);
  }
  bool disjoint() {
    std::sort(taken.begin(), taken.end());
    for (std::size_t i = 1; i < taken.size(); ++i)
      if (taken[i].first < taken[i - 1].second) return false;
    return true;
  }
};

// Allocates until the next request of `bytes` needs a new chunk from the upstream.
void fill_current_chunk(arena_resource& arena, std::size_t bytes) {
  for (;;) {
    const auto before = arena.stats().upstream_allocations;
    auto m = arena.mark();
    (void)arena.allocate(bytes, 8);
    if (arena.stats().upstream_allocations != before) {
      arena.rewind(m);
      arena.trim();  // so that the next chunk has to come from the upstream
      return;
    }
  }
}

}  // namespace

TEST_SUITE("arena_resource") {

TEST_CASE("the default constructor behaves as monotonic_buffer_resource's") {
  check_parity([](bool arena, void*, std::size_t, std::pmr::memory_resource*) {
    return arena ? std::unique_ptr<std::pmr::memory_resource>(std::make_unique<arena_resource>())
                 : std::make_unique<std::pmr::monotonic_buffer_resource>();
  }, 0);
}

TEST_CASE("the upstream constructor behaves as monotonic_buffer_resource's") {
  check_parity([](bool arena, void*, std::size_t, std::pmr::memory_resource* up) {
    return make_either(arena, up);
  }, 0);
}

TEST_CASE("the initial-size constructor behaves as monotonic_buffer_resource's") {
  for (std::size_t initial : {std::size_t{1}, std::size_t{100}, std::size_t{1072}, std::size_t{5000}}) {
    CAPTURE(initial);
    check_parity([initial](bool arena, void*, std::size_t, std::pmr::memory_resource*) {
      return make_either(arena, initial);
    }, 0);
  }
}

TEST_CASE("the initial-size and upstream constructor behaves as monotonic_buffer_resource's") {
  check_parity([](bool arena, void*, std::size_t, std::pmr::memory_resource* up) {
    return make_either(arena, std::size_t{300}, up);
  }, 0);
}

TEST_CASE("the buffer constructor behaves as monotonic_buffer_resource's") {
  for (std::size_t size : {std::size_t{0}, std::size_t{1}, std::size_t{256}, std::size_t{4096}}) {
    CAPTURE(size);
    check_parity([](bool arena, void* buffer, std::size_t n, std::pmr::memory_resource*) {
      return make_either(arena, buffer, n);
    }, size);
  }
}

TEST_CASE("the buffer and upstream constructor behaves as monotonic_buffer_resource's") {
  check_parity([](bool arena, void* buffer, std::size_t n, std::pmr::memory_resource* up) {
    return make_either(arena, buffer, n, up);
  }, 1000);
}

TEST_CASE("bad options are rejected") {
  recording_resource up;
  alignas(16) std::byte buffer[64];
  CHECK_THROWS_AS(arena_resource(arena_options{}, nullptr), std::invalid_argument);
  CHECK_THROWS_AS(arena_resource(arena_options{.initial_size = 0}, &up), std::invalid_argument);
  CHECK_THROWS_AS(arena_resource(arena_options{.growth_factor = 0.99}, &up), std::invalid_argument);
  CHECK_THROWS_AS(arena_resource(arena_options{.growth_factor = std::numeric_limits<double>::quiet_NaN()}, &up),
                  std::invalid_argument);
  CHECK_THROWS_AS(arena_resource(arena_options{.growth_factor = std::numeric_limits<double>::infinity()}, &up),
                  std::invalid_argument);
  CHECK_THROWS_AS(arena_resource(arena_options{.max_chunk_size = 0}, &up), std::invalid_argument);
  CHECK_THROWS_AS(arena_resource(arena_options{.initial_size = 4096, .max_chunk_size = 1024}, &up),
                  std::invalid_argument);
  CHECK_NOTHROW(arena_resource(buffer, 0, &up));
  CHECK(up.allocations() == 0);
}

TEST_CASE("options set the first chunk, the growth and the largest chunk") {
  recording_resource up;
  {
    arena_resource arena(arena_options{.initial_size = 1000, .growth_factor = 2.0, .max_chunk_size = 5000},
                         &up);
    for (int i = 0; i < 4000; ++i) (void)arena.allocate(16, 16);
    (void)arena.allocate(20000, 8);  // larger than the largest chunk: a chunk of its own
    const auto sizes = sizes_of(up);
    REQUIRE(sizes.size() >= 6);
    // Usable sizes 1000, 2000, 4000, then 5000 forever; the block adds a 16-byte header
    // and is rounded up to 64 bytes.
    CHECK(sizes[0] == 1024);
    CHECK(sizes[1] == 2048);
    CHECK(sizes[2] == 4032);
    for (std::size_t i = 3; i + 1 < sizes.size(); ++i) CHECK(sizes[i] == 5056);
    CHECK(sizes.back() >= 20000 + 16);
    CHECK(arena.stats().chunks == sizes.size());
  }
  CHECK(up.outstanding() == 0);
}

TEST_CASE("every pointer is aligned as asked, for alignments from 1 to 65536") {
  recording_resource up;
  arena_resource arena(&up);
  layout_checker layout(up);
  for (std::size_t alignment = 1; alignment <= 65536; alignment *= 2) {
    CAPTURE(alignment);
    for (std::size_t bytes : {std::size_t{1}, std::size_t{7}, std::size_t{100}, alignment + 3}) {
      void* p = arena.allocate(bytes, alignment);
      CHECK(addr(p) % alignment == 0);
      std::memset(p, 0xA5, bytes);
      layout.add(p, bytes);
    }
  }
  CHECK(layout.disjoint());
}

TEST_CASE("an alignment that is not a power of two is a bad_alloc and changes nothing") {
  recording_resource up;
  arena_resource arena(arena_options{.reuse_last_block = true}, &up);
  void* first = arena.allocate(24, 8);
  arena.deallocate(first, 24, 8);  // the most recent block: its bytes come back
  const auto before = arena.stats();
  for (std::size_t bad : {std::size_t{0}, std::size_t{3}, std::size_t{6}, std::size_t{48},
                          std::numeric_limits<std::size_t>::max()}) {
    CAPTURE(bad);
    CHECK_THROWS_AS((void)arena.allocate(24, bad), memshuffle::bad_alignment);
    CHECK_THROWS_AS((void)arena.allocate(24, bad), std::bad_alloc);
    CHECK(same(arena.stats(), before));
  }
  CHECK(arena.allocate(24, 8) == first);
  CHECK(up.allocations() == 1);
}

TEST_CASE("zero-byte requests give distinct usable pointers") {
  recording_resource up;
  arena_resource arena(&up);
  std::vector<void*> seen;
  for (int i = 0; i < 5000; ++i) {
    void* p = arena.allocate(0, 1);
    REQUIRE(p != nullptr);
    seen.push_back(p);
    if (i % 7 == 0) arena.deallocate(p, 0, 1);
    else if (i % 3 == 0) seen.push_back(arena.allocate(5, 4));
  }
  CHECK(up.mismatches() == 0);
  layout_checker layout(up);
  arena.reset();
  for (int i = 0; i < 100; ++i) layout.add(arena.allocate(0, 1), 0);
  CHECK(layout.disjoint());
  CHECK(arena.stats().bytes_used == 0);
  CHECK(arena.stats().allocations == 100);
}

TEST_CASE("a request larger than the chunk size gets a chunk of its own") {
  recording_resource up;
  arena_resource arena(std::size_t{1024}, &up);
  (void)arena.allocate(16, 8);
  const std::size_t big = 1 << 20;
  void* p = arena.allocate(big, 64);
  auto blocks = up.live_blocks();
  REQUIRE(blocks.size() == 2);
  const auto& own = blocks[0].bytes > blocks[1].bytes ? blocks[0] : blocks[1];
  CHECK(own.bytes >= big);
  CHECK(addr(p) >= addr(own.p));
  CHECK(addr(p) + big <= addr(own.p) + own.bytes);
  std::memset(p, 1, big);
}

TEST_CASE("with reuse_last_block, deallocating the most recent block gives its bytes back, other deallocations do not") {
  recording_resource up;
  arena_resource arena(arena_options{.reuse_last_block = true}, &up);
  void* a = arena.allocate(64, 16);
  void* b = arena.allocate(32, 16);
  CHECK(arena.stats().bytes_used == 96);
  arena.deallocate(a, 64, 16);  // not the most recent: nothing
  CHECK(arena.stats().bytes_used == 96);
  CHECK(arena.stats().allocations == 2);
  arena.deallocate(b, 32, 16);  // the most recent: popped
  CHECK(arena.stats().bytes_used == 64);
  CHECK(arena.stats().allocations == 1);
  CHECK(arena.allocate(32, 16) == b);
  void* c = arena.allocate(8, 8);
  arena.deallocate(c, 16, 8);  // wrong size: not this block's end, nothing
  CHECK(arena.allocate(8, 8) != c);
  CHECK(arena.stats().peak_bytes_used == 112);
}

TEST_CASE("reset keeps the chunks and hands out the same addresses again") {
  MEMSHUFFLE_TEST_SEED(seed);
  const auto requests = random_requests(seed, 2000);
  recording_resource up;
  arena_resource arena(&up);
  std::vector<void*> first_round;
  for (auto& r : requests) first_round.push_back(arena.allocate(r.bytes, r.alignment));
  const auto grown = arena.stats();
  CHECK(grown.bytes_reserved == up.outstanding_bytes());
  for (int round = 0; round < 5; ++round) {
    CAPTURE(round);
    arena.reset();
    CHECK(arena.stats().bytes_used == 0);
    std::vector<void*> again;
    for (auto& r : requests) again.push_back(arena.allocate(r.bytes, r.alignment));
    CHECK(again == first_round);
    CHECK(arena.stats().bytes_reserved == grown.bytes_reserved);
    CHECK(arena.stats().upstream_allocations == grown.upstream_allocations);
    CHECK(up.allocations() == grown.upstream_allocations);
  }
}

TEST_CASE("stats count used, reserved, chunks, allocations and the peak") {
  recording_resource up;
  arena_resource arena(std::size_t{1000}, &up);
  CHECK(same(arena.stats(), arena_stats{}));
  std::size_t used = 0;
  for (std::size_t i = 1; i <= 300; ++i) {
    (void)arena.allocate(i, 8);
    used += i;
  }
  auto s = arena.stats();
  CHECK(s.bytes_used == used);
  CHECK(s.allocations == 300);
  CHECK(s.peak_bytes_used == used);
  CHECK(s.chunks == up.outstanding());
  CHECK(s.bytes_reserved == up.outstanding_bytes());
  CHECK(s.upstream_allocations == up.allocations());
  CHECK(s.bytes_reserved >= used);
  arena.reset();
  (void)arena.allocate(10, 8);
  s = arena.stats();
  CHECK(s.bytes_used == 10);
  CHECK(s.allocations == 1);
  CHECK(s.peak_bytes_used == used);
  CHECK(s.chunks == up.outstanding());
  arena.release();
  CHECK(arena.stats().bytes_reserved == 0);
  CHECK(arena.stats().chunks == 0);
}

TEST_CASE("trim gives back the chunks a reset left empty") {
  recording_resource up;
  arena_resource arena(std::size_t{256}, &up);
  for (int i = 0; i < 100; ++i) (void)arena.allocate(64, 8);
  REQUIRE(up.outstanding() > 2);
  arena.reset();
  (void)arena.allocate(64, 8);   // the first chunk again
  (void)arena.allocate(300, 8);  // too big for the next spare: a new chunk goes before it
  arena.trim();
  CHECK(up.outstanding() == 2);
  CHECK(arena.stats().chunks == 2);
  CHECK(arena.stats().bytes_reserved == up.outstanding_bytes());
  (void)arena.allocate(64, 8);
  CHECK(up.mismatches() == 0);
}

TEST_CASE("an upstream that throws leaves the arena usable and unchanged") {
  recording_resource up;
  arena_resource arena(std::size_t{512}, &up);
  up.fail_after(0);
  CHECK_THROWS_AS((void)arena.allocate(8, 8), std::bad_alloc);  // the very first chunk
  CHECK(same(arena.stats(), arena_stats{}));
  void* p = arena.allocate(8, 8);
  fill_current_chunk(arena, 64);
  const auto before = arena.stats();
  const arena_marker m = arena.mark();
  up.fail_after(0);
  CHECK_THROWS_AS((void)arena.allocate(64, 8), std::bad_alloc);
  CHECK(same(arena.stats(), before));
  arena.rewind(m);  // markers taken before the failure stay valid
  void* q = arena.allocate(64, 8);
  CHECK(arena.stats().upstream_allocations == before.upstream_allocations + 1);
  CHECK(addr(q) != addr(p));
  CHECK(up.failures_injected() == 2);
}

TEST_CASE("release restores the caller's buffer and the first chunk size (LWG 3120)") {
  recording_resource up;
  alignas(16) std::byte buffer[512];
  arena_resource arena(buffer, sizeof buffer, &up);
  std::vector<void*> first;
  for (int i = 0; i < 200; ++i) first.push_back(arena.allocate(16, 8));
  const auto first_sizes = sizes_of(up);
  REQUIRE(first_sizes.size() >= 2);
  arena.release();
  CHECK(up.outstanding() == 0);
  std::vector<void*> again;
  for (int i = 0; i < 200; ++i) again.push_back(arena.allocate(16, 8));
  CHECK(std::equal(first.begin(), first.begin() + 32, again.begin()));  // the buffer's 512 bytes
  const auto sizes = sizes_of(up);
  CHECK(std::vector(sizes.begin() + static_cast<std::ptrdiff_t>(first_sizes.size()), sizes.end()) ==
        first_sizes);
}

TEST_CASE("after release no allocation returns memory that was given back (boostorg/container#65)") {
  MEMSHUFFLE_TEST_SEED(seed);
  recording_resource up;
  up.keep_freed(true);  // freed blocks stay mapped, so a stale pointer into them is seen
  alignas(64) std::byte buffer[300];
  arena_resource arena(buffer, sizeof buffer, &up);
  for (int round = 0; round < 4; ++round) {
    CAPTURE(round);
    layout_checker layout(up, buffer, sizeof buffer);
    for (auto& r : random_requests(seed + static_cast<std::uint64_t>(round), 500)) {
      void* p = arena.allocate(r.bytes, r.alignment);
      layout.add(p, r.bytes);
    }
    CHECK(layout.disjoint());
    arena.release();
    CHECK(up.outstanding() == 0);
  }
}

TEST_CASE("alignment padding near the end of a chunk never runs past it (boostorg/container#151)") {
  recording_resource up;
  alignas(64) std::byte buffer[64];
  arena_resource arena(buffer, sizeof buffer, &up);
  layout_checker layout(up, buffer, sizeof buffer);
  layout.add(arena.allocate(1, 1), 1);
  void* p = arena.allocate(40, 32);  // fits in 63 bytes, not after padding to 32
  layout.add(p, 40);
  CHECK(addr(p) % 32 == 0);
  CHECK(up.allocations() == 1);
  // The same at every distance from a chunk's end.
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 20000; ++i) {
    const std::size_t alignment = std::size_t{1} << (rng() % 9);
    const std::size_t bytes = rng() % 200;
    void* q = arena.allocate(bytes, alignment);
    CHECK(addr(q) % alignment == 0);
    layout.add(q, bytes);
  }
  CHECK(layout.disjoint());
}

TEST_CASE("a huge request throws bad_alloc instead of wrapping around (boostorg/container#159)") {
  // Refuses what no machine has, and remembers the largest request, so a size that
  // wrapped around to something small would be seen.
  struct bounded_resource : std::pmr::memory_resource {
    std::size_t largest_refused = 0;
    void* do_allocate(std::size_t bytes, std::size_t alignment) override {
      if (bytes > (std::size_t{1} << 40) || alignment > (std::size_t{1} << 40)) {
        largest_refused = std::max(largest_refused, bytes);
        throw std::bad_alloc();
      }
      return std::pmr::new_delete_resource()->allocate(bytes, alignment);
    }
    void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
      std::pmr::new_delete_resource()->deallocate(p, bytes, alignment);
    }
    bool do_is_equal(const std::pmr::memory_resource& o) const noexcept override { return this == &o; }
  } bounded;
  recording_resource up(&bounded);
  arena_resource arena(&up);
  (void)arena.allocate(100, 8);
  const auto before = arena.stats();
  constexpr std::size_t max = std::numeric_limits<std::size_t>::max();
  for (std::size_t bytes : {max, max - 15, max - 64, max / 2, max / 2 + 1}) {
    CAPTURE(bytes);
    CHECK_THROWS_AS((void)arena.allocate(bytes, 16), std::bad_alloc);
    CHECK_THROWS_AS((void)arena.allocate(bytes, 4096), std::bad_alloc);
    CHECK(same(arena.stats(), before));
    CHECK(up.allocations() == 1);  // nothing small was asked for instead
  }
  CHECK(bounded.largest_refused > max / 2);  // the sizes that fit in size_t were asked for whole
  std::size_t huge_alignment = std::size_t{1} << 63;  // not a constant: clang rejects those
  CHECK_THROWS_AS((void)arena.allocate(8, huge_alignment), std::bad_alloc);
  CHECK(same(arena.stats(), before));
  void* p = arena.allocate(100, 8);
  std::memset(p, 0, 100);
  CHECK(up.outstanding() == 1);
}

TEST_CASE("nothing is left outstanding upstream after release or destruction") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  recording_resource up;
  {
    arena_resource arena(std::size_t{128}, &up);
    std::vector<arena_marker> marks;
    for (int i = 0; i < 20000; ++i) {
      switch (rng() % 50) {
        case 0: arena.reset(); marks.clear(); break;
        case 1: arena.trim(); break;
        case 2: marks.push_back(arena.mark()); break;
        case 3:
          if (!marks.empty()) { arena.rewind(marks.back()); marks.pop_back(); }
          break;
        case 4: arena.release(); marks.clear(); CHECK(up.outstanding() == 0); break;
        default: {
          const std::size_t bytes = rng() % 3000;
          void* p = arena.allocate(bytes, std::size_t{1} << (rng() % 8));
          if (rng() % 4 == 0) arena.deallocate(p, bytes);
        }
      }
      REQUIRE(arena.stats().bytes_reserved == up.outstanding_bytes());
    }
  }
  check_upstream_clean(up);
}

TEST_CASE("an arena is equal only to itself") {
  recording_resource up;
  arena_resource a(&up), b(&up);
  CHECK(a.is_equal(a));
  CHECK_FALSE(a.is_equal(b));
  CHECK_FALSE(a.is_equal(up));
}

}  // TEST_SUITE
