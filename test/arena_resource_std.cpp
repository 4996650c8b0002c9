// arena_resource as a drop-in for std::pmr::monotonic_buffer_resource: the standard's
// wording ([mem.res.monotonic.buffer]) checked one clause at a time, then the same
// operations run side by side against the standard class, comparing what a caller
// sees. boost::container::pmr code reaches it through boost_resource_adaptor.
#include <memshuffle/arena_resource.hpp>
#include <memshuffle/detail/sanitizers.hpp>
#include <memshuffle/error.hpp>
#include <memshuffle/resource_adaptors.hpp>

#include <doctest/doctest.h>

#include <boost/container/pmr/monotonic_buffer_resource.hpp>
#include <boost/container/pmr/vector.hpp>

#include "test/support/monotonic_trace.hpp"
#include "test/support/page_aligned_resource.hpp"
#include "test/support/recording_resource.hpp"
#include "test/support/seed.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <memory_resource>
#include <new>
#include <sstream>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

using memshuffle::arena_options;
using memshuffle::arena_resource;
using memshuffle::testing::page_aligned_resource;
using memshuffle::testing::recording_resource;

namespace {

using mono = std::pmr::monotonic_buffer_resource;

// The exception specifications of libstdc++'s constructors.
static_assert(std::is_nothrow_default_constructible_v<arena_resource> ==
              std::is_nothrow_default_constructible_v<mono>);
static_assert(std::is_nothrow_constructible_v<arena_resource, std::pmr::memory_resource*> ==
              std::is_nothrow_constructible_v<mono, std::pmr::memory_resource*>);
static_assert(std::is_nothrow_constructible_v<arena_resource, std::size_t> ==
              std::is_nothrow_constructible_v<mono, std::size_t>);
static_assert(std::is_nothrow_constructible_v<arena_resource, std::size_t, std::pmr::memory_resource*> ==
              std::is_nothrow_constructible_v<mono, std::size_t, std::pmr::memory_resource*>);
static_assert(std::is_nothrow_constructible_v<arena_resource, void*, std::size_t> ==
              std::is_nothrow_constructible_v<mono, void*, std::size_t>);
static_assert(std::is_nothrow_constructible_v<arena_resource, void*, std::size_t, std::pmr::memory_resource*> ==
              std::is_nothrow_constructible_v<mono, void*, std::size_t, std::pmr::memory_resource*>);
static_assert(noexcept(std::declval<arena_resource&>().release()));
static_assert(noexcept(std::declval<arena_resource&>().upstream_resource()));
static_assert(!std::is_copy_constructible_v<arena_resource> && !std::is_copy_assignable_v<arena_resource>);
static_assert(std::is_base_of_v<std::pmr::memory_resource, arena_resource>);

// What a caller sees of one operation.
struct seen {
  std::string what;  // "p <index>" (the n-th distinct address) or the exception's kind
  std::size_t upstream_calls;
  std::size_t upstream_outstanding;
  bool operator==(const seen&) const = default;
};

// A script of operations, the same for both resources: allocate, deallocate a live
// block, release, and an upstream that refuses its next call.
struct script_runner {
  page_aligned_resource pages;
  recording_resource up{&pages};
  std::vector<std::pair<void*, std::size_t>> live;

  // Where p lies: the n-th upstream block and the offset in it. The same name twice
  // is an address reused.
  std::string name(void* p) {
    const auto blocks = up.history();
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    for (std::size_t i = blocks.size(); i-- > 0;) {
      const auto b = reinterpret_cast<std::uintptr_t>(blocks[i].p);
      if (a >= b && a < b + blocks[i].bytes)
        return "block " + std::to_string(i) + " + " + std::to_string(a - b);
    }
    return "outside every block";
  }

  template <class Resource>
  std::vector<seen> run(Resource& r, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<seen> out;
    for (int step = 0; step < 2000; ++step) {
      std::string what;
      const auto pick = rng() % 20;
      if (pick < 12 || live.empty()) {
        const std::size_t bytes = rng() % 8 == 0 ? rng() % 3000 : rng() % 64;
        const std::size_t alignment = std::size_t{1} << (rng() % 7);
        if (rng() % 50 == 0) up.fail_after(0);
        try {
          void* p = r.allocate(bytes, alignment);
          live.emplace_back(p, bytes);
          what = name(p);
        } catch (const std::bad_alloc&) {
          what = "bad_alloc";
        }
        up.fail_never();
      } else if (pick < 19) {
        const std::size_t i = rng() % 4 == 0 ? rng() % live.size() : live.size() - 1;
        r.deallocate(live[i].first, live[i].second);
        live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
        what = "deallocate";
      } else {
        r.release();
        live.clear();
        what = "release";
      }
      out.push_back({what, up.allocations(), up.outstanding()});
    }
    return out;
  }
};

// The traces of the script in test/support/monotonic_trace.hpp.
using memshuffle::testing::trace_config;

template <class Resource>
std::string trace_of(const trace_config& c) {
  memshuffle::testing::monotonic_tracer tracer;
  return tracer.run(c, [](void* buffer, std::size_t size, std::size_t initial, std::pmr::memory_resource* up) {
    return buffer ? std::make_unique<Resource>(buffer, size, up) : std::make_unique<Resource>(initial, up);
  });
}

std::vector<trace_config> trace_configs(std::uint64_t seed) {
  std::vector<trace_config> out;
  for (std::size_t initial : {std::size_t{1}, std::size_t{256}, std::size_t{4000}}) out.push_back({seed, 0, initial});
  out.push_back({seed, 1000, 0});
  return out;
}

// The program built against libc++ (test/meson.build), when there is one.
#ifdef MEMSHUFFLE_LIBCXX_TRACE
constexpr const char* libcxx_trace_program = MEMSHUFFLE_LIBCXX_TRACE;
#else
constexpr const char* libcxx_trace_program = nullptr;
#endif

std::string libcxx_trace_of(const trace_config& c) {
  const std::string command = std::string(libcxx_trace_program) + ' ' + std::to_string(c.seed) + ' ' +
                              std::to_string(c.buffer_size) + ' ' + std::to_string(c.initial);
  std::string out;
  FILE* f = popen(command.c_str(), "r");
  REQUIRE(f != nullptr);
  std::array<char, 4096> chunk;
  for (std::size_t n; (n = std::fread(chunk.data(), 1, chunk.size(), f)) > 0;) out.append(chunk.data(), n);
  REQUIRE(pclose(f) == 0);
  return out;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// A line without what depends on chunk sizes: whether the upstream was asked (and so
// could refuse) at that step.
std::string without_refusal(std::string line) {
  const std::string refusal = ", after the upstream's bad_alloc";
  if (const auto at = line.find(refusal); at != std::string::npos) line.erase(at, refusal.size());
  return line;
}

// libc++ hands out a zero-byte block at its current position without moving it, so the
// next block may start there: the one behaviour in which the two libraries differ.
bool zero_byte_reuse(const std::string& libcxx_line) {
  return libcxx_line.starts_with("allocate 0 at ") && libcxx_line.find("REUSED") != std::string::npos;
}

}  // namespace

TEST_SUITE("arena_resource") {

TEST_CASE("the script's trace of arena_resource is that of libstdc++'s monotonic_buffer_resource") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::size_t refusals = 0;
  for (const auto& c : trace_configs(seed)) {
    CAPTURE(c.initial);
    CAPTURE(c.buffer_size);
    const auto ours = trace_of<arena_resource>(c);
    for (const auto& line : lines_of(ours)) refusals += line.find("after the upstream's bad_alloc") != std::string::npos;
    CHECK(ours == trace_of<mono>(c));
  }
  CHECK(refusals > 0);  // the script met the upstream's failures
}

TEST_CASE("the script's trace of arena_resource is that of libc++'s monotonic_buffer_resource but for zero-byte blocks" *
          doctest::skip(libcxx_trace_program == nullptr)) {
  MEMSHUFFLE_TEST_SEED(seed);
  for (const auto& c : trace_configs(seed)) {
    CAPTURE(c.initial);
    CAPTURE(c.buffer_size);
    const auto ours = lines_of(trace_of<arena_resource>(c));
    const auto theirs = lines_of(libcxx_trace_of(c));
    REQUIRE(ours.size() == theirs.size());
    for (std::size_t i = 0; i < ours.size(); ++i) {
      CAPTURE(i);
      CAPTURE(theirs[i]);
      if (without_refusal(ours[i]) != without_refusal(theirs[i])) CHECK(zero_byte_reuse(theirs[i]));
    }
  }
}

TEST_CASE("side by side with monotonic_buffer_resource a caller sees the same addresses, upstream calls, exceptions and release state") {
  MEMSHUFFLE_TEST_SEED(seed);
  for (std::size_t initial : {std::size_t{1}, std::size_t{256}, std::size_t{4000}}) {
    CAPTURE(initial);
    script_runner a, b;
    mono standard(initial, &a.up);
    arena_resource arena(initial, &b.up);
    const auto expected = a.run(standard, seed);
    const auto got = b.run(arena, seed);
    REQUIRE(got.size() == expected.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      CAPTURE(i);
      CHECK(got[i].what == expected[i].what);
      CHECK(got[i].upstream_calls == expected[i].upstream_calls);
      CHECK(got[i].upstream_outstanding == expected[i].upstream_outstanding);
      if (got[i] != expected[i]) break;
    }
  }
}

// [mem.res.monotonic.buffer.mem]: "do_deallocate: Effects: None."
TEST_CASE("deallocate has no effect: the bytes of even the most recent block are not reused") {
  recording_resource up;
  arena_resource arena(&up);
  void* a = arena.allocate(32, 8);
  const auto before = arena.stats();
  arena.deallocate(a, 32, 8);
  CHECK(arena.stats().bytes_used == before.bytes_used);
  CHECK(arena.stats().allocations == before.allocations);
  CHECK(arena.allocate(32, 8) != a);
  CHECK_FALSE(arena.options().reuse_last_block);
}

// "Postconditions: ... the next buffer size is initial_size" and "initial_size > 0" is
// only asserted by libstdc++; libc++ takes 0. Both arenas take it.
TEST_CASE("the constructors take what both standard libraries take: a null buffer with a size, an initial size of 0") {
  recording_resource up;
  {
    arena_resource arena(nullptr, 100, &up);  // libc++: no buffer, first chunk from the size
    mono standard(nullptr, 100, &up);
    void* p = arena.allocate(8, 8);
    CHECK(p != nullptr);
    CHECK(up.allocations() == 1);
    CHECK(arena.stats().chunks == 1);
    (void)standard;
  }
  {
    arena_resource arena(std::size_t{0}, &up);
    CHECK(arena.options().initial_size == 1);
    CHECK(arena.allocate(100, 8) != nullptr);
  }
  {
    arena_resource arena(nullptr, 0, &up);
    CHECK(arena.allocate(1, 1) != nullptr);
  }
  CHECK(up.outstanding() == 0);
}

// "do_allocate: ... Throws: Nothing unless upstream_resource()->allocate() throws."
TEST_CASE("allocate throws only what the upstream throws: a huge size reaches the upstream") {
  struct marked_failure : std::bad_alloc {};
  struct refusing : std::pmr::memory_resource {
    std::size_t largest = 0;
    void* do_allocate(std::size_t bytes, std::size_t) override {
      largest = std::max(largest, bytes);
      throw marked_failure();
    }
    void do_deallocate(void*, std::size_t, std::size_t) override {}
    bool do_is_equal(const std::pmr::memory_resource& o) const noexcept override { return this == &o; }
  } up;
  arena_resource arena(&up);
  constexpr std::size_t max = std::numeric_limits<std::size_t>::max();
  for (std::size_t bytes : {std::size_t{100}, max / 2, max - 10, max}) {
    CAPTURE(bytes);
    CHECK_THROWS_AS((void)arena.allocate(bytes, 8), marked_failure);
    CHECK(up.largest >= std::min(bytes, max / 2));
  }
  const std::size_t huge_alignment = std::size_t{1} << 62;
  CHECK_THROWS_AS((void)arena.allocate(8, huge_alignment), marked_failure);
  CHECK(arena.stats().bytes_reserved == 0);
}

// [mem.res.public]: the alignment shall be a power of two. The standard leaves the
// rest undefined; every memshuffle resource throws bad_alignment, a std::bad_alloc.
TEST_CASE("an alignment that is not a power of two is a bad_alloc as new_delete_resource's") {
  recording_resource up;
  arena_resource arena(&up);
  // The sanitizer's operator new aborts on such an alignment instead of throwing.
  if (!memshuffle::detail::address_sanitizer)
    CHECK_THROWS_AS((void)std::pmr::new_delete_resource()->allocate(8, 3), std::bad_alloc);
  CHECK_THROWS_AS((void)arena.allocate(8, 3), std::bad_alloc);
  try {
    (void)arena.allocate(8, 12);
  } catch (const memshuffle::bad_alignment& e) {
    CHECK(std::string(e.what()).find("power of two") != std::string::npos);
  }
  CHECK(up.allocations() == 0);
}

// "release: Effects: Calls upstream_rsrc->deallocate() as necessary to release all
// allocated memory. Resets current_buffer and next_buffer_size to their initial values
// at construction."
TEST_CASE("release gives everything back and restores the buffer and the next buffer size") {
  alignas(16) std::byte buffer[256];
  recording_resource up_a, up_b;
  mono standard(buffer, sizeof buffer, &up_a);
  arena_resource arena(buffer, sizeof buffer, &up_b);
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    CHECK(arena.allocate(16, 8) == static_cast<void*>(buffer));
    for (int i = 0; i < 50; ++i) {
      (void)standard.allocate(100, 8);
      (void)arena.allocate(100, 8);
    }
    CHECK(up_b.history().back().bytes == up_a.history().back().bytes);
    standard.release();
    arena.release();
    CHECK(up_b.outstanding() == 0);
    CHECK(arena.stats().bytes_reserved == 0);
    (void)standard.allocate(16, 8);
  }
  CHECK(up_b.history().size() == up_a.history().size());
}

// "memory_resource* upstream_resource() const; Returns: The value of upstream_rsrc."
// "bool do_is_equal(const memory_resource& other) const noexcept; Returns: this == &other."
TEST_CASE("upstream_resource and is_equal are as the standard says") {
  recording_resource up;
  arena_resource a(&up), b(&up);
  CHECK(a.upstream_resource() == &up);
  CHECK(a.is_equal(a));
  CHECK_FALSE(a.is_equal(b));
  std::pmr::memory_resource* previous = std::pmr::set_default_resource(&up);
  arena_resource d;
  CHECK(d.upstream_resource() == &up);
  std::pmr::set_default_resource(previous);
}

TEST_CASE("through boost_resource_adaptor, code written for boost's monotonic_buffer_resource sees the same") {
  recording_resource up_a, up_b;
  memshuffle::boost_resource_adaptor boost_up(&up_a);
  boost::container::pmr::monotonic_buffer_resource boost_mono(&boost_up);
  arena_resource arena(&up_b);
  memshuffle::boost_resource_adaptor bridge(&arena);
  boost::container::pmr::memory_resource& a = boost_mono;
  boost::container::pmr::memory_resource& b = bridge;
  void* pa = a.allocate(40, 8);
  void* pb = b.allocate(40, 8);
  a.deallocate(pa, 40, 8);
  b.deallocate(pb, 40, 8);
  CHECK((a.allocate(40, 8) == pa) == (b.allocate(40, 8) == pb));  // neither reuses
  {
    boost::container::pmr::vector<int> va(&a), vb(&b);
    for (int i = 0; i < 1000; ++i) {
      va.push_back(i);
      vb.push_back(i);
    }
    CHECK(va == vb);
  }
  CHECK(up_b.allocations() >= 1);
  boost_mono.release();
  arena.release();
  CHECK(up_a.outstanding() == 0);
  CHECK(up_b.outstanding() == 0);
}

}  // TEST_SUITE
