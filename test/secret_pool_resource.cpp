// secret_pool_resource: packing into runs of pages, guard pages around each run,
// wiping, misuse, run sizes under RLIMIT_MEMLOCK, threads, and the bar: a million
// shuffler entries with 500 open windows under a 64 KiB lock budget.
#include <doctest/doctest.h>

#include <memshuffle/error.hpp>
#include <memshuffle/secret_pool_resource.hpp>
#include <memshuffle/shuffler.hpp>
#include <test/support/child_process.hpp>
#include <test/support/secret_backends.hpp>
#include <test/support/seed.hpp>
#include <test/support/smaps.hpp>

#include "lib/secret_memory.hpp"
#include "lib/secret_pages.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <vector>

using namespace memshuffle;
using namespace memshuffle::testing;

namespace {

const std::size_t page = detail::page_size();
#ifdef MEMSHUFFLE_DEBUG_CHECKS
constexpr bool debug_checks_enabled = true;
#else
constexpr bool debug_checks_enabled = false;
#endif
// Fills a fresh pool's first run of 64-byte blocks and writes one byte at `offset` from
// the start of its first (offset < 0) or last block, in a child; returns how the child
// ended.
int write_around_run(secret_backend backend, std::ptrdiff_t offset) {
  return run_in_child([=] {
    secret_pool_resource pool({.backend = backend, .run_pages = 4});
    std::vector<void*> blocks;
    const std::size_t per_run = pool.options().run_pages * page / 64;
    for (std::size_t i = 0; i < per_run; ++i) blocks.push_back(pool.allocate(64, 8));
    if (pool.stats().runs != 1) return false;
    const auto [lo, hi] = std::minmax_element(blocks.begin(), blocks.end());
    const std::uintptr_t base = address_of(offset < 0 ? *lo : *hi);
    default_segv_action();
    *reinterpret_cast<volatile char*>(base + static_cast<std::uintptr_t>(offset)) = 1;
    return true;
  });
}

}  // namespace

TEST_SUITE("resources") {

TEST_CASE("small secrets of one size class share a run of pages") {
  secret_pool_resource pool({.run_pages = 4});
  std::vector<void*> blocks;
  for (int i = 0; i < 500; ++i) blocks.push_back(pool.allocate(64, 8));
  const auto s = pool.stats();
  CHECK(s.blocks == 500);
  CHECK(s.runs == (500 * 64 + 4 * page - 1) / (4 * page));
  CHECK(s.bytes_mapped == s.runs * 6 * page);   // 4 pages and 2 guard pages a run
  std::set<std::uintptr_t> starts;
  for (void* p : blocks) starts.insert(address_of(p));
  CHECK(starts.size() == 500);
  std::uintptr_t previous_end = 0;
  for (auto a : starts) {   // in address order: no two blocks overlap
    CHECK(a >= previous_end);
    previous_end = a + 64;
  }
  for (void* p : blocks) pool.deallocate(p, 64, 8);
  CHECK(pool.stats().blocks == 0);
  CHECK(pool.stats().runs == 1);   // one empty run kept for reuse
}

TEST_CASE("every size class keeps its alignment and larger blocks get pages of their own") {
  secret_pool_resource pool;
  for (std::size_t bytes : {0, 1, 8, 9, 24, 64, 100, 512, 1024, 1025, 5000}) {
    for (std::size_t alignment : {1, 8, 16, 64, 256, 4096}) {
      CAPTURE(bytes);
      CAPTURE(alignment);
      auto* p = static_cast<unsigned char*>(pool.allocate(bytes, alignment));
      CHECK(address_of(p) % alignment == 0);
      CHECK(all_zero(p, bytes));
      std::memset(p, 0xA5, bytes);
      const bool own_pages = std::max(bytes, alignment) > secret_pool_resource::largest_class;
      CHECK(pool.stats().large_allocations == (own_pages ? 1u : 0u));
      pool.deallocate(p, bytes, alignment);
    }
  }
  const auto s = pool.stats();
  CHECK(s.blocks == 0);
  CHECK(s.large_allocations == 0);
  CHECK(s.bad_deallocations == 0);
}

TEST_CASE("an alignment above the page size or not a power of two is bad_alignment and changes nothing") {
  secret_pool_resource pool;
  void* keep = pool.allocate(32);
  const auto before = pool.stats();
  for (std::size_t bad : {page * 2, std::size_t{0}, std::size_t{48}}) {
    CAPTURE(bad);
    CHECK_THROWS_AS((void)pool.allocate(32, bad), memshuffle::bad_alignment);
  }
  CHECK(pool.stats().total_allocations == before.total_allocations);
  CHECK(pool.stats().bytes_mapped == before.bytes_mapped);
  pool.deallocate(keep, 32);
}

TEST_CASE("a run_pages above 1024 is refused") {
  CHECK_THROWS_AS(secret_pool_resource({.run_pages = 1025}), std::invalid_argument);
}

TEST_CASE("writing one byte past a run of pooled blocks dies of SIGSEGV") {
  for (auto backend : backends()) {
    const std::string backend_name = to_string(backend);
    CAPTURE(backend_name);
    const int overrun = write_around_run(backend, 64);
    INFO("child " << describe(overrun));
    CHECK(killed_by(overrun, SIGSEGV));
    const int control = write_around_run(backend, 63);
    INFO("control child " << describe(control));
    CHECK(exited_with(control, 0));
  }
}

TEST_CASE("writing one byte before a run of pooled blocks dies of SIGSEGV") {
  for (auto backend : backends()) {
    const std::string backend_name = to_string(backend);
    CAPTURE(backend_name);
    const int underrun = write_around_run(backend, -1);
    INFO("child " << describe(underrun));
    CHECK(killed_by(underrun, SIGSEGV));
  }
}

TEST_CASE("a freed pooled block and the pages of an emptied run hold zeros") {
  secret_pool_resource pool;
  auto* a = static_cast<unsigned char*>(pool.allocate(128));
  auto* b = static_cast<unsigned char*>(pool.allocate(128));
  std::memset(a, 0xEE, 128);
  std::memset(b, 0xEE, 128);
  pool.deallocate(a, 128);
  CHECK(all_zero(a, 128));   // b keeps the run mapped
  CHECK(b[0] == 0xEE);
  pool.deallocate(b, 128);
  CHECK(pool.stats().runs == 1);   // kept for reuse, so still readable
  CHECK(all_zero(a, 128));
  CHECK(all_zero(b, 128));
  auto* again = static_cast<unsigned char*>(pool.allocate(128));
  CHECK(all_zero(again, 128));
  pool.deallocate(again, 128);
}

TEST_CASE("a freed large block is wiped and its pages serve the next block of its size") {
  secret_pool_resource pool;
  const std::size_t n = 4 * 1024;
  auto* a = static_cast<unsigned char*>(pool.allocate(n));
  std::memset(a, 0xEE, n);
  const std::size_t mapped = pool.stats().bytes_mapped;
  pool.deallocate(a, n);
  CHECK(pool.stats().large_allocations == 0);
  CHECK(pool.stats().bytes_mapped == mapped);  // kept for reuse, so still readable
  CHECK(all_zero(a, n));
  auto* again = static_cast<unsigned char*>(pool.allocate(n));
  CHECK(again == a);  // no kernel call: the spare span again
  CHECK(all_zero(again, n));
  pool.deallocate(again, n);
}

TEST_CASE("only a few emptied large spans are kept, the rest are unmapped") {
  secret_pool_resource pool;
  std::vector<void*> blocks;
  for (int i = 0; i < 6; ++i) blocks.push_back(pool.allocate(2 * page));
  for (void* p : blocks) pool.deallocate(p, 2 * page);
  CHECK(pool.stats().bytes_mapped == 4 * (2 + 2) * page);  // four spans, guard pages included
  CHECK(pool.stats().spare_large_bytes == 4 * (2 + 2) * page);
  const std::ptrdiff_t readable = std::count_if(blocks.begin(), blocks.end(), [](void* p) { return mapped(p); });
  CHECK(readable == 4);
}

TEST_CASE("a run beyond the one kept for reuse is unmapped when it empties") {
  secret_pool_resource pool({.run_pages = 1});
  const std::size_t per_run = page / 512;
  std::vector<void*> blocks;
  for (std::size_t i = 0; i < 3 * per_run; ++i) blocks.push_back(pool.allocate(512));
  CHECK(pool.stats().runs == 3);
  for (void* p : blocks) pool.deallocate(p, 512);
  CHECK(pool.stats().runs == 1);
  CHECK(pool.stats().bytes_mapped == 3 * page);
  CHECK(std::count_if(blocks.begin(), blocks.end(), [](void* p) { return mapped(p); }) ==
        static_cast<std::ptrdiff_t>(per_run));
}

TEST_CASE("double free, a foreign pointer and a wrong size or alignment are ignored and counted" *
          doctest::skip(debug_checks_enabled)) {
  secret_pool_resource pool;
  auto* a = static_cast<unsigned char*>(pool.allocate(64));
  auto* big = static_cast<unsigned char*>(pool.allocate(2000));
  std::memset(a, 3, 64);
  int foreign = 0;
  const auto before = pool.stats();
  pool.deallocate(&foreign, 64);   // not from the pool
  pool.deallocate(a + 8, 64);      // inside a block
  pool.deallocate(a, 512);         // another size class
  pool.deallocate(a, 64, 128);     // another alignment class
  pool.deallocate(big, 1999);      // a large block with the wrong size
  pool.deallocate(big, 2000, 3);   // not a power of two
  CHECK(pool.stats().bad_deallocations == 6);
  CHECK(pool.stats().blocks == before.blocks);
  CHECK(a[63] == 3);   // nothing was wiped or freed
  pool.deallocate(a, 64);
  pool.deallocate(a, 64);          // double free
  CHECK(pool.stats().bad_deallocations == 7);
  CHECK(pool.stats().blocks == 0);
  pool.deallocate(big, 2000);
  pool.deallocate(big, 2000);      // double free of a large block (now unmapped)
  CHECK(pool.stats().bad_deallocations == 8);
  // The pool still works and hands each block out once.
  void* x = pool.allocate(64);
  void* y = pool.allocate(64);
  CHECK(x != y);
  pool.deallocate(x, 64);
  pool.deallocate(y, 64);
  CHECK(pool.stats().bad_deallocations == 8);
}

TEST_CASE("a bad deallocation aborts with a message in debug_checks builds" *
          doctest::skip(!debug_checks_enabled)) {
  const int status = run_in_child([] {
    secret_pool_resource pool;
    void* p = pool.allocate(64);
    pool.deallocate(p, 64);
    pool.deallocate(p, 64);
    return true;
  });
  CHECK(killed_by(status, SIGABRT));
}

TEST_CASE("the library's secret memory is the process-wide pool") {
  CHECK(detail::secret_memory() == &default_secret_pool());
  CHECK(default_secret_pool().options().lock_refused == on_lock_refused::fail);
  CHECK(default_secret_pool().options().backend == secret_backend::automatic);
}

}  // TEST_SUITE("resources")

TEST_SUITE("concurrency") {

TEST_CASE("several threads allocate and free secrets of every size class at once") {
  MEMSHUFFLE_TEST_SEED(seed);
  secret_pool_resource pool;
  std::vector<std::thread> threads;
  std::vector<int> bad(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed + static_cast<std::uint64_t>(t));
      std::vector<std::pair<unsigned char*, std::size_t>> live;
      for (int i = 0; i < 3000; ++i) {
        if (live.size() < 64 && rng() % 3 != 0) {
          const std::size_t bytes = 1 + rng() % 1500;
          auto* p = static_cast<unsigned char*>(pool.allocate(bytes));
          if (!all_zero(p, bytes)) ++bad[static_cast<std::size_t>(t)];
          std::memset(p, t + 1, bytes);
          live.emplace_back(p, bytes);
        } else if (!live.empty()) {
          auto [p, bytes] = live[rng() % live.size()];
          if (p[0] != t + 1 || p[bytes - 1] != t + 1) ++bad[static_cast<std::size_t>(t)];
          pool.deallocate(p, bytes);
          live.erase(std::find(live.begin(), live.end(), std::make_pair(p, bytes)));
        }
      }
      for (auto [p, bytes] : live) pool.deallocate(p, bytes);
    });
  for (auto& th : threads) th.join();
  CHECK(bad == std::vector<int>(4, 0));
  CHECK(pool.stats().blocks == 0);
  CHECK(pool.stats().large_allocations == 0);
  CHECK(pool.stats().bad_deallocations == 0);
}

}  // TEST_SUITE("concurrency")

TEST_SUITE("resources") {

TEST_CASE("runs take a sixteenth of RLIMIT_MEMLOCK, one page to sixteen") {
  for (auto [limit, pages] : {std::pair<std::size_t, std::size_t>{64 * 1024, 1},
                              {16 * page * 8, 8}, {4 * 1024 * 1024, 16}}) {
    CAPTURE(limit);
    const int status = run_in_child([limit, pages] {
      if (!limit_memlock(limit)) return false;
      secret_pool_resource pool;
      void* p = pool.allocate(64);
      const bool sized = pool.stats().bytes_mapped == (pages + 2) * page;
      pool.deallocate(p, 64);
      return sized;
    });
    INFO("child " << describe(status));
    CHECK(exited_with(status, 0));
  }
}

// The bar of the pool: a million entries and 500 open windows under a 64 KiB budget.
TEST_CASE("a shuffler of a million entries keeps 500 open windows locked under a 64 KiB lock budget" *
          doctest::skip(!mlock_is_real)) {
  MEMSHUFFLE_TEST_SEED(seed);
  const int status = run_in_child([seed] {
    if (!limit_memlock(64 * 1024)) return false;
    secret_pool_resource& pool = default_secret_pool();
    shuffler s(shuffler_options{.plaintext_resource = &pool});
    std::mt19937_64 rng(seed);
    std::vector<handle> handles;
    handles.reserve(1'000'000);
    for (int i = 0; i < 1'000'000; ++i) handles.push_back(s.alloc<std::byte>(32 + rng() % 33));
    std::vector<lease<std::byte>> open;
    for (std::size_t i = 0; open.size() < 500; ++i)
      if (s.size_of(handles[i * 7919 % handles.size()]) == 64) open.push_back(s.rent<std::byte>(handles[i * 7919 % handles.size()]));
    const auto maps = all_mappings();
    const auto protected_window = [&](const std::byte* p) {
      for (const auto& m : maps)
        if (m.begin <= address_of(p) && address_of(p) < m.end)
          return m.flags.find(" lo ") != std::string::npos && m.flags.find(" dd ") != std::string::npos;
      return false;
    };
    const bool all_protected = std::all_of(open.begin(), open.end(),
                                           [&](const auto& l) { return protected_window(l.get()); });
    const auto r = pool.report();
    const bool clean = r.lock_refusals == 0 && r.fallbacks == 0 && !r.degraded && r.locked;
    if (!all_protected || !clean) std::fprintf(stderr, "protected %d, report clean %d\n", all_protected, clean);
    return all_protected && clean && s.stats().live_entries == 1'000'000;
  });
  INFO("child " << describe(status));
  CHECK(exited_with(status, 0));
}

}  // TEST_SUITE("resources")

TEST_SUITE("resources") {

TEST_CASE("a rent whose window is refused a lock leaves the entry sealed and the shuffler usable") {
  secret_pool_resource pool({.backend = secret_backend::locked_pages, .run_pages = 1});
  shuffler s(shuffler_options{.plaintext_resource = &pool});
  const handle h = s.alloc<std::byte>(64);
  {
    auto l = s.rent<std::byte>(h);
    for (std::size_t i = 0; i < 64; ++i) l.get()[i] = static_cast<std::byte>(i);
  }
  // Fill the 64-byte run, so the next window needs a new one.
  std::vector<void*> filler;
  for (std::size_t i = 0; i < page / 64; ++i) filler.push_back(pool.allocate(64));
  REQUIRE(pool.stats().runs == 1);
  // The fifth kernel call of a new run of locked pages is its mlock.
  detail::inject_page_fault(4);
  CHECK_THROWS_AS((void)s.rent<std::byte>(h), secret_memory_refused);
  detail::inject_page_fault(-1);
  CHECK(s.stats().pinned_entries == 0);
  CHECK(pool.stats().runs == 1);
  {
    auto l = s.rent<std::byte>(h);
    bool same = true;
    for (std::size_t i = 0; i < 64; ++i) same = same && l.get()[i] == static_cast<std::byte>(i);
    CHECK(same);
  }
  for (void* p : filler) pool.deallocate(p, 64);
}

}  // TEST_SUITE("resources")
