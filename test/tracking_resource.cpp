#include <doctest/doctest.h>
#include <memshuffle/doctest.hpp>
#include <memshuffle/tracking_resource.hpp>
#include <test/support/failing_new.hpp>
#include <test/support/recording_resource.hpp>
#include <test/support/seed.hpp>
#include <test/support/upstream_checks.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include <memshuffle/detail/sanitizers.hpp>
#ifdef MEMSHUFFLE_ASAN
#include <sanitizer/asan_interface.h>
#endif

using memshuffle::bad_deallocation_kind;
using memshuffle::tracking_options;
using memshuffle::tracking_resource;
using memshuffle::testing::check_upstream_clean;
using memshuffle::testing::recording_resource;

namespace {

bool all_bytes_are(const void* p, std::size_t n, std::byte value) {
  auto* b = static_cast<const std::byte*>(p);
  return std::all_of(b, b + n, [&](std::byte x) { return x == value; });
}

struct block {
  void* p;
  std::size_t bytes, alignment;
};

// A random mix of allocations and deallocations, checked against a simple model.
void run_counting_model(tracking_options options) {
  recording_resource upstream;
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937 rng(static_cast<std::mt19937::result_type>(seed));
  {
    tracking_resource tracking(options, &upstream);
    std::vector<block> live;
    std::size_t current = 0, peak = 0, peak_count = 0, total = 0, total_bytes = 0;
    for (int step = 0; step < 2000; ++step) {
      if (live.empty() || rng() % 3 != 0) {
        const std::size_t bytes = rng() % 300;
        const std::size_t alignment = std::size_t{1} << (rng() % 8);
        live.push_back({tracking.allocate(bytes, alignment), bytes, alignment});
        current += bytes;
        total_bytes += bytes;
        ++total;
        peak = std::max(peak, current);
        peak_count = std::max(peak_count, live.size());
      } else {
        const auto i = rng() % live.size();
        tracking.deallocate(live[i].p, live[i].bytes, live[i].alignment);
        current -= live[i].bytes;
        live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
      }
      const auto st = tracking.stats();
      REQUIRE(st.current_allocations == live.size());
      REQUIRE(st.current_bytes == current);
      REQUIRE(st.peak_bytes == peak);
      REQUIRE(st.peak_allocations == peak_count);
      REQUIRE(st.total_allocations == total);
      REQUIRE(st.total_bytes == total_bytes);
      REQUIRE(st.bad_deallocations == 0);
    }
    // live_allocations() is the model's live set, in allocation order.
    const auto records = tracking.live_allocations();
    REQUIRE(records.size() == live.size());
    for (std::size_t i = 0; i < records.size(); ++i) {
      CHECK(records[i].pointer == live[i].p);
      CHECK(records[i].bytes == live[i].bytes);
      CHECK(records[i].alignment == live[i].alignment);
      if (i > 0) CHECK(records[i - 1].sequence < records[i].sequence);
    }
    for (auto& b : live) tracking.deallocate(b.p, b.bytes, b.alignment);
    CHECK_FALSE(tracking.has_leaks());
  }
  check_upstream_clean(upstream);
}

// Makes one bad deallocation of each kind's shape on a fresh resource and checks it
// was recorded as `kind` and never reached the upstream.
template <class Misuse>
void check_bad_deallocation(bad_deallocation_kind kind, Misuse misuse) {
  recording_resource upstream;
  {
    tracking_resource tracking(&upstream);
    void* p = tracking.allocate(64, 16);
    const auto allocations_upstream = upstream.allocations();
    misuse(tracking, p);
    const auto bad = tracking.bad_deallocations();
    REQUIRE(bad.size() == 1);
    CHECK(bad[0].kind == kind);
    CHECK(tracking.stats().bad_deallocations == 1);
    CHECK(tracking.has_bad_deallocations());
    CHECK(upstream.mismatches() == 0);
    CHECK(upstream.allocations() == allocations_upstream);
    const auto text = tracking.report();
    CHECK(text.find(memshuffle::to_string(kind)) != std::string::npos);
    // The resource still works: the live block, if any, frees normally.
    if (tracking.has_leaks()) tracking.deallocate(p, 64, 16);
    CHECK_FALSE(tracking.has_leaks());
  }
  check_upstream_clean(upstream);
}

}  // namespace

TEST_CASE("a tracking resource counts allocations and bytes exactly") {
  MEMSHUFFLE_LEAK_CHECK();
  run_counting_model({});
}

TEST_CASE("an unsynchronized tracking resource counts exactly the same") {
  MEMSHUFFLE_LEAK_CHECK();
  run_counting_model({.thread_safe = false});
}

TEST_CASE("a leak is kept with its size, alignment and sequence, and reported") {
  recording_resource upstream;
  {
    tracking_resource tracking(&upstream);
    void* a = tracking.allocate(10, 2);
    void* leaked = tracking.allocate(48, 32);
    void* c = tracking.allocate(7, 1);
    tracking.deallocate(a, 10, 2);
    tracking.deallocate(c, 7, 1);

    CHECK(tracking.has_leaks());
    const auto live = tracking.live_allocations();
    REQUIRE(live.size() == 1);
    CHECK(live[0].pointer == leaked);
    CHECK(live[0].bytes == 48);
    CHECK(live[0].alignment == 32);
    CHECK(live[0].sequence == 2);

    std::ostringstream os;
    tracking.report(os);
    const auto text = os.str();
    CAPTURE(text);
    CHECK(std::count(text.begin(), text.end(), '\n') == 2);  // one leak line + totals
    CHECK(text.find("leak: allocation #2, 48 bytes, alignment 32") != std::string::npos);
    CHECK(text.find("totals: 1 live allocations (48 bytes)") != std::string::npos);
    tracking.deallocate(leaked, 48, 32);
    CHECK_FALSE(tracking.has_leaks());
  }
  check_upstream_clean(upstream);
}

TEST_CASE("the destructor leaves leaked blocks to the caller and release_leaks gives them back") {
  recording_resource upstream;
  {
    tracking_resource tracking(&upstream);
    (void)tracking.allocate(100, 8);
    (void)tracking.allocate(0, 8);
    CHECK(upstream.outstanding() == 2);
    tracking.release_leaks();
    CHECK(upstream.outstanding() == 0);
    CHECK_FALSE(tracking.has_leaks());
    CHECK(tracking.stats().current_bytes == 0);
  }
  check_upstream_clean(upstream);
  // A leak survives the tracking resource (ASan/LSan or the upstream's owner see it).
  {
    tracking_resource tracking(&upstream);
    (void)tracking.allocate(40, 8);
  }
  CHECK(upstream.outstanding() == 1);
  CHECK(upstream.mismatches() == 0);
}

TEST_CASE("a pointer the resource never gave is reported and not passed upstream") {
  alignas(16) static std::byte stray[64];
  check_bad_deallocation(bad_deallocation_kind::unknown_pointer,
                         [](tracking_resource& t, void*) { t.deallocate(stray, 64, 16); });
}

TEST_CASE("a double free is reported and not passed upstream") {
  check_bad_deallocation(bad_deallocation_kind::double_free, [](tracking_resource& t, void* p) {
    t.deallocate(p, 64, 16);
    t.deallocate(p, 64, 16);
  });
}

TEST_CASE("a deallocation with the wrong size is reported and the block stays live") {
  check_bad_deallocation(bad_deallocation_kind::wrong_size, [](tracking_resource& t, void* p) {
    t.deallocate(p, 32, 16);
    CHECK(t.has_leaks());
    CHECK(t.stats().current_bytes == 64);
  });
}

TEST_CASE("a deallocation with the wrong alignment is reported and the block stays live") {
  check_bad_deallocation(bad_deallocation_kind::wrong_alignment,
                         [](tracking_resource& t, void* p) {
                           t.deallocate(p, 64, 8);
                           CHECK(t.live_allocations().size() == 1);
                           const auto bad = t.bad_deallocations();
                           REQUIRE(bad.size() == 1);
                           CHECK(bad[0].block.pointer == p);
                           CHECK(bad[0].block.alignment == 16);
                         });
}

TEST_CASE("wipe_on_deallocate zeroes a block before the upstream gets it back") {
  const std::byte secret[] = {std::byte{0x5e}, std::byte{0xc2}, std::byte{0xe7}, std::byte{0x11}};
  for (const bool wipe : {false, true}) {
    CAPTURE(wipe);
    recording_resource upstream;
    upstream.keep_freed(true);  // freed blocks stay readable
    tracking_resource tracking({.wipe_on_deallocate = wipe}, &upstream);
    auto* p = static_cast<std::byte*>(tracking.allocate(256, 8));
    for (std::size_t i = 0; i < 256; i += sizeof secret) std::memcpy(p + i, secret, sizeof secret);
    tracking.deallocate(p, 256, 8);
    CHECK(upstream.deallocations() == 1);
    CHECK(upstream.contains(secret) == !wipe);
    CHECK(all_bytes_are(p, 256, std::byte{0}) == wipe);
    CHECK(upstream.mismatches() == 0);
  }
}

TEST_CASE("fill_on_allocate writes the pattern into every new block") {
  recording_resource upstream;
  {
    tracking_resource tracking({.fill_on_allocate = std::byte{0xA5}}, &upstream);
    for (std::size_t bytes : {1u, 63u, 4096u}) {
      CAPTURE(bytes);
      void* p = tracking.allocate(bytes, 8);
      CHECK(all_bytes_are(p, bytes, std::byte{0xA5}));
      std::memset(p, 0, bytes);
      tracking.deallocate(p, bytes, 8);
    }
  }
  check_upstream_clean(upstream);
}

TEST_CASE("quarantine keeps freed blocks from the upstream until it is released") {
  recording_resource upstream;
  {
    tracking_resource tracking({.quarantine = true}, &upstream);
    std::set<void*> freed;
    for (int i = 0; i < 100; ++i) {
      void* p = tracking.allocate(64, 8);
      CHECK(freed.count(p) == 0);  // never handed out again while quarantined
      tracking.deallocate(p, 64, 8);
      freed.insert(p);
    }
    CHECK(upstream.outstanding() == 100);
    CHECK(tracking.stats().quarantined_allocations == 100);
    CHECK(tracking.stats().quarantined_bytes == 6400);
    CHECK_FALSE(tracking.has_leaks());
    tracking.release_quarantine();
    CHECK(upstream.outstanding() == 0);
    CHECK(tracking.stats().quarantined_bytes == 0);
    // The destructor releases what is quarantined at the end.
    tracking.deallocate(tracking.allocate(8, 8), 8, 8);
    CHECK(upstream.outstanding() == 1);
  }
  check_upstream_clean(upstream);
}

#ifdef MEMSHUFFLE_ASAN
TEST_CASE("under AddressSanitizer quarantined memory is poisoned until it is released") {
  recording_resource upstream;
  tracking_resource tracking({.quarantine = true}, &upstream);
  void* p = tracking.allocate(64, 8);
  CHECK_FALSE(__asan_address_is_poisoned(p));
  tracking.deallocate(p, 64, 8);
  CHECK(__asan_address_is_poisoned(p));
  CHECK(__asan_address_is_poisoned(static_cast<char*>(p) + 63));
  tracking.release_quarantine();
  CHECK(upstream.outstanding() == 0);
}
#endif

TEST_CASE("a double free of a quarantined block is caught") {
  recording_resource upstream;
  {
    tracking_resource tracking({.quarantine = true}, &upstream);
    void* p = tracking.allocate(16, 8);
    tracking.deallocate(p, 16, 8);
    tracking.deallocate(p, 16, 8);
    const auto bad = tracking.bad_deallocations();
    REQUIRE(bad.size() == 1);
    CHECK(bad[0].kind == bad_deallocation_kind::double_free);
    CHECK(tracking.stats().quarantined_allocations == 1);
  }
  check_upstream_clean(upstream);
}

TEST_CASE("an upstream that throws leaves the tracking resource as it was") {
  recording_resource upstream;
  {
    tracking_resource tracking(&upstream);
    std::vector<void*> blocks;
    for (int i = 0; i < 50; ++i) blocks.push_back(tracking.allocate(32, 8));
    const auto before = tracking.stats();
    upstream.fail_after(0);
    CHECK_THROWS_AS((void)tracking.allocate(32, 8), std::bad_alloc);
    const auto after = tracking.stats();
    CHECK(after.current_allocations == before.current_allocations);
    CHECK(after.total_allocations == before.total_allocations);
    CHECK(after.total_bytes == before.total_bytes);
    CHECK(tracking.live_allocations().size() == 50);
    for (void* p : blocks) tracking.deallocate(p, 32, 8);
    CHECK_FALSE(tracking.has_leaks());
    CHECK(tracking.stats().bad_deallocations == 0);
  }
  check_upstream_clean(upstream);
}

TEST_CASE("the live table grows under many live blocks and keeps every record") {
  recording_resource upstream;
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937 rng(static_cast<std::mt19937::result_type>(seed));
  {
    tracking_resource tracking(&upstream);
    std::vector<block> live;
    std::size_t bytes_live = 0;
    for (int i = 0; i < 20000; ++i) {
      const std::size_t bytes = 1 + rng() % 200, alignment = std::size_t{1} << (rng() % 7);
      live.push_back({tracking.allocate(bytes, alignment), bytes, alignment});
      bytes_live += bytes;
    }
    const auto records = tracking.live_allocations();
    REQUIRE(records.size() == live.size());
    for (std::size_t i = 0; i < live.size(); ++i) {
      REQUIRE(records[i].pointer == live[i].p);
      REQUIRE(records[i].bytes == live[i].bytes);
      REQUIRE(records[i].sequence == i + 1);
    }
    CHECK(tracking.stats().current_bytes == bytes_live);
    // Freed in random order, with a stray pointer into each live block between frees:
    // every one is found, and every stray is refused.
    std::shuffle(live.begin(), live.end(), rng);
    std::size_t strays = 0;
    for (std::size_t i = 0; i < live.size(); ++i) {
      if (i + 1 < live.size() && i % 10 == 0) {
        tracking.deallocate(static_cast<char*>(live[i + 1].p) + 1, live[i + 1].bytes,
                            live[i + 1].alignment);
        ++strays;
      }
      tracking.deallocate(live[i].p, live[i].bytes, live[i].alignment);
    }
    const auto st = tracking.stats();
    CHECK(st.bad_deallocations == strays);
    CHECK(st.current_allocations == 0);
    CHECK(st.peak_allocations == live.size());
    CHECK(st.total_deallocations == live.size());
    CHECK_FALSE(tracking.has_leaks());
  }
  check_upstream_clean(upstream);
}

TEST_CASE("a live table that cannot grow refuses before the upstream is asked") {
  recording_resource upstream;
  {
    tracking_resource tracking(&upstream);
    std::vector<void*> blocks;
    std::optional<memshuffle::tracking_stats> before, after;
    std::size_t upstream_before = 0, upstream_after = 0, live_after = 0;
    {
      // Sooner or later the table needs a larger array than operator new will give.
      // What is seen is only kept here and checked once operator new works again.
      // (Its other users here ask for less than 4 KiB.)
      const memshuffle::testing::failing_new::scoped_refusal refuse(4096);
      for (int i = 0; i < 100 && !after; ++i) {
        before = tracking.stats();
        upstream_before = upstream.allocations();
        try {
          blocks.push_back(tracking.allocate(32, 8));
        } catch (const std::bad_alloc&) {
          after = tracking.stats();
          upstream_after = upstream.allocations();
          live_after = tracking.live_allocations().size();
        }
      }
    }
    REQUIRE(after.has_value());
    CHECK(after->current_allocations == before->current_allocations);
    CHECK(after->current_bytes == before->current_bytes);
    CHECK(after->peak_allocations == before->peak_allocations);
    CHECK(after->total_allocations == before->total_allocations);
    CHECK(after->total_bytes == before->total_bytes);
    CHECK(live_after == blocks.size());
    CHECK(upstream_after == upstream_before);  // the upstream was never asked
    CHECK(upstream.outstanding() == blocks.size());
    // Still works, and sequence numbers carry on without a gap.
    blocks.push_back(tracking.allocate(32, 8));
    const auto live = tracking.live_allocations();
    REQUIRE(live.size() == blocks.size());
    CHECK(live.back().sequence == blocks.size());
    for (void* p : blocks) tracking.deallocate(p, 32, 8);
    CHECK_FALSE(tracking.has_leaks());
    CHECK(tracking.stats().bad_deallocations == 0);
  }
  check_upstream_clean(upstream);
}

TEST_CASE("zero-byte allocations are distinct and tracked") {
  recording_resource upstream;
  {
    tracking_resource tracking(&upstream);
    void* a = tracking.allocate(0, 1);
    void* b = tracking.allocate(0, 1);
    CHECK(a != b);
    CHECK(tracking.stats().current_allocations == 2);
    CHECK(tracking.stats().current_bytes == 0);
    tracking.deallocate(a, 0, 1);
    tracking.deallocate(b, 0, 1);
    CHECK_FALSE(tracking.has_leaks());
  }
  check_upstream_clean(upstream);
}

TEST_CASE("every power-of-two alignment up to 4096 reaches the upstream") {
  recording_resource upstream;
  {
    tracking_resource tracking(&upstream);
    for (std::size_t alignment = 1; alignment <= 4096; alignment *= 2) {
      CAPTURE(alignment);
      void* p = tracking.allocate(3 * alignment, alignment);
      CHECK(reinterpret_cast<std::uintptr_t>(p) % alignment == 0);
      CHECK(upstream.history().back().alignment == alignment);
      tracking.deallocate(p, 3 * alignment, alignment);
    }
  }
  check_upstream_clean(upstream);
}

TEST_CASE("a tracking resource is equal only to itself") {
  recording_resource upstream;
  tracking_resource a(&upstream), b(&upstream);
  CHECK(a.is_equal(a));
  CHECK_FALSE(a.is_equal(b));
  CHECK_FALSE(a.is_equal(upstream));
  CHECK_THROWS_AS(tracking_resource(nullptr), std::invalid_argument);
}

TEST_CASE("the report is cut after many leaks but counts them all") {
  recording_resource upstream;
  {
    tracking_resource tracking(&upstream);
    std::vector<void*> blocks;
    for (int i = 0; i < 300; ++i) blocks.push_back(tracking.allocate(8, 8));
    const auto text = tracking.report();
    CHECK(text.find("... and 44 more leaks") != std::string::npos);
    CHECK(text.find("totals: 300 live allocations") != std::string::npos);
    for (void* p : blocks) tracking.deallocate(p, 8, 8);
  }
  check_upstream_clean(upstream);
}

TEST_SUITE("concurrency") {
  TEST_CASE("several threads allocate and free through one tracking resource") {
    recording_resource upstream;
    constexpr int threads = 4, rounds = 5000;
    {
      tracking_resource tracking(&upstream);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&tracking, t] {
          std::vector<void*> mine;
          for (int i = 0; i < rounds; ++i) {
            mine.push_back(tracking.allocate(16 + static_cast<std::size_t>(t), 8));
            if (i % 3 == 2) {
              tracking.deallocate(mine.back(), 16 + static_cast<std::size_t>(t), 8);
              mine.pop_back();
            }
          }
          for (void* p : mine) tracking.deallocate(p, 16 + static_cast<std::size_t>(t), 8);
        });
      for (auto& th : pool) th.join();
      const auto st = tracking.stats();
      CHECK(st.total_allocations == threads * rounds);
      CHECK(st.total_deallocations == threads * rounds);
      CHECK(st.current_allocations == 0);
      CHECK(st.bad_deallocations == 0);
      CHECK(st.total_bytes == rounds * (16 + 17 + 18 + 19));
    }
    check_upstream_clean(upstream);
  }
}
