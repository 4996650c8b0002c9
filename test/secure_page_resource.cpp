// secure_page_resource: placement against the guard pages (checked the way libsodium
// checks sodium_malloc, by faulting in a child), locking under RLIMIT_MEMLOCK, core
// dump exclusion, and unmapping.
#include <doctest/doctest.h>

#include <memshuffle/error.hpp>
#include <memshuffle/secure_page_resource.hpp>
#include <test/support/child_process.hpp>
#include <test/support/smaps.hpp>

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory_resource>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using memshuffle::secure_page_options;
using memshuffle::secure_page_resource;
using namespace memshuffle::testing;

namespace {

const std::size_t page = secure_page_resource::page_size();

std::uintptr_t address(const void* p) { return address_of(p); }

// Allocates a block in a child, writes one byte at `offset` from its start, and
// reports how the child ended.
int write_in_child(secure_page_options options, std::size_t bytes, std::size_t alignment,
                   std::ptrdiff_t offset) {
  return run_in_child([=] {
    secure_page_resource r(options);
    void* p = r.allocate(bytes, alignment);
    default_segv_action();
    auto* target = reinterpret_cast<volatile char*>(address(p) + static_cast<std::uintptr_t>(offset));
    *target = 1;
    return true;
  });
}

}  // namespace

TEST_SUITE("resources") {

TEST_CASE("a secure page allocation ends exactly at its trailing guard page") {
  secure_page_resource r;
  for (std::size_t bytes : {1, 7, 32, 100, 4095, 4096, 4097, 20000}) {
    CAPTURE(bytes);
    void* p = r.allocate(bytes, 1);
    CHECK((address(p) + bytes) % page == 0);
    std::memset(p, 0x5A, bytes);   // every byte is writable
    r.deallocate(p, bytes, 1);
  }
}

TEST_CASE("a secure page allocation keeps every alignment up to the page size") {
  secure_page_resource r;
  for (std::size_t alignment = 1; alignment <= page; alignment *= 2) {
    for (std::size_t bytes : {1, 24, 1000, 5000}) {
      CAPTURE(alignment);
      CAPTURE(bytes);
      void* p = r.allocate(bytes, alignment);
      CHECK(address(p) % alignment == 0);
      CHECK(address(p) + bytes <= (address(p) + bytes + page - 1) / page * page);
      std::memset(p, 1, bytes);
      r.deallocate(p, bytes, alignment);
    }
  }
  CHECK(r.stats().allocations == 0);
}

TEST_CASE("an alignment above the page size or not a power of two is bad_alignment and changes nothing") {
  secure_page_resource r;
  void* keep = r.allocate(64);
  const auto before = r.stats();
  CHECK_THROWS_AS((void)r.allocate(64, page * 2), memshuffle::bad_alignment);
  for (std::size_t not_a_power_of_two : {48, 0, 3}) {
    CAPTURE(not_a_power_of_two);
    CHECK_THROWS_AS((void)r.allocate(64, not_a_power_of_two), memshuffle::bad_alignment);
  }
  const auto after = r.stats();
  CHECK(after.allocations == before.allocations);
  CHECK(after.total_allocations == before.total_allocations);
  CHECK(after.bytes_mapped == before.bytes_mapped);
  r.deallocate(keep, 64);
}

TEST_CASE("stats count mapped pages with their guard pages and return to zero after deallocation") {
  secure_page_resource guarded;
  secure_page_resource bare(secure_page_options{.lock = false, .guard_pages = false});
  void* a = guarded.allocate(5000);
  void* b = bare.allocate(5000);
  CHECK(guarded.stats().bytes_mapped == 4 * page);   // 2 data pages + 2 guard pages
  CHECK(bare.stats().bytes_mapped == 2 * page);
  CHECK(bare.stats().bytes_locked == 0);
  CHECK_FALSE(bare.locked());
  CHECK(guarded.stats().allocations == 1);
  guarded.deallocate(a, 5000);
  bare.deallocate(b, 5000);
  for (const auto& s : {guarded.stats(), bare.stats()}) {
    CHECK(s.bytes_mapped == 0);
    CHECK(s.bytes_locked == 0);
    CHECK(s.allocations == 0);
    CHECK(s.total_allocations == 1);
  }
}

TEST_CASE("writing one byte past the end of a guarded block dies of SIGSEGV") {
  for (std::size_t bytes : {1, 32, 4096, 4097}) {
    CAPTURE(bytes);
    const int status = write_in_child({}, bytes, 1, static_cast<std::ptrdiff_t>(bytes));
    INFO("child " << describe(status));
    CHECK(killed_by(status, SIGSEGV));
    // The control: the last byte itself is writable.
    const int control = write_in_child({}, bytes, 1, static_cast<std::ptrdiff_t>(bytes) - 1);
    INFO("control child " << describe(control));
    CHECK(exited_with(control, 0));
  }
}

TEST_CASE("writing one byte before the start of a guarded block dies of SIGSEGV") {
  // A whole page starts at the leading guard page; a smaller block starts inside its
  // page, and writing before that page faults.
  const int whole_page = write_in_child({}, page, 1, -1);
  INFO("child " << describe(whole_page));
  CHECK(killed_by(whole_page, SIGSEGV));
  const std::size_t small = 100;
  const int before_page = write_in_child({}, small, 1, -static_cast<std::ptrdiff_t>(page - small) - 1);
  INFO("child " << describe(before_page));
  CHECK(killed_by(before_page, SIGSEGV));
  const int control = write_in_child({}, small, 1, -static_cast<std::ptrdiff_t>(page - small));
  INFO("control child " << describe(control));
  CHECK(exited_with(control, 0));
}

TEST_CASE("when mlock is refused by RLIMIT_MEMLOCK the memory still works and says it is not locked" *
          doctest::skip(!mlock_is_real)) {
  const int status = run_in_child([] {
    if (!limit_memlock(0)) return false;
    secure_page_resource r;
    auto* p = static_cast<char*>(r.allocate(64));
    std::memset(p, 7, 64);
    const auto s = r.stats();
    const bool ok = !r.locked() && s.lock_failures == 1 && s.bytes_locked == 0 &&
                    s.allocations == 1 && p[63] == 7;
    r.deallocate(p, 64);
    return ok;
  });
  INFO("child " << describe(status));
  CHECK(exited_with(status, 0));
}

TEST_CASE("mlock is granted up to the RLIMIT_MEMLOCK budget and refused past it" *
          doctest::skip(!mlock_is_real)) {
  const int status = run_in_child([] {
    if (!limit_memlock(64 * 1024)) return false;
    secure_page_resource r;
    std::vector<void*> blocks;
    for (std::size_t used = 0; used + page <= 64 * 1024; used += page) blocks.push_back(r.allocate(32));
    const bool all_locked = r.locked() && r.stats().bytes_locked == blocks.size() * page &&
                            has_flag(blocks.front(), "lo");
    void* over = r.allocate(32);
    const bool refused = !r.locked() && r.stats().lock_failures == 1;
    r.deallocate(over, 32);
    const bool locked_again = r.locked();
    for (void* p : blocks) r.deallocate(p, 32);
    return all_locked && refused && locked_again && r.stats().bytes_locked == 0;
  });
  INFO("child " << describe(status));
  CHECK(exited_with(status, 0));
}

TEST_CASE("under fail a refused mlock throws a bad_alloc and maps nothing" *
          doctest::skip(!mlock_is_real)) {
  const int status = run_in_child([] {
    if (!limit_memlock(0)) return false;
    secure_page_resource r(secure_page_options{.lock_refused = memshuffle::on_lock_refused::fail});
    bool threw = false;
    try {
      (void)r.allocate(64);
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    const auto s = r.stats();
    return threw && s.allocations == 0 && s.bytes_mapped == 0 && s.total_allocations == 0;
  });
  INFO("child " << describe(status));
  CHECK(exited_with(status, 0));
}

TEST_CASE("a fork child sees zeros where the parent's secure pages hold data") {
  secure_page_resource r;
  auto* p = static_cast<unsigned char*>(r.allocate(64));
  std::memset(p, 0x42, 64);
  CHECK(has_flag(p, "wf"));
  const int status = run_in_child([p] {
    return std::all_of(p, p + 64, [](unsigned char c) { return c == 0; });
  });
  INFO("child " << describe(status));
  CHECK(exited_with(status, 0));
  CHECK(p[63] == 0x42);
  r.deallocate(p, 64);
}

TEST_CASE("secure pages are left out of core dumps") {
  secure_page_resource r;
  secure_page_resource dumped(secure_page_options{.dont_dump = false});
  void* p = r.allocate(64);
  void* q = dumped.allocate(64);
  CHECK(has_flag(p, "dd"));
  CHECK_FALSE(has_flag(q, "dd"));
  CHECK_FALSE(vm_flags(q).empty());
  r.deallocate(p, 64);
  dumped.deallocate(q, 64);
}

TEST_CASE("deallocation and destruction unmap the pages") {
  void* freed = nullptr;
  void* left = nullptr;
  {
    secure_page_resource r;
    freed = r.allocate(100);
    left = r.allocate(100);
    CHECK(mapped(freed));
    r.deallocate(freed, 100);
    CHECK_FALSE(mapped(freed));
    CHECK(mapped(left));
    r.deallocate(reinterpret_cast<void*>(address(left) + 8), 92);   // not ours: ignored
    CHECK(mapped(left));
    CHECK(r.stats().allocations == 1);
  }
  CHECK_FALSE(mapped(left));
}

TEST_CASE("a secure page resource equals only itself") {
  secure_page_resource a, b;
  CHECK(a.is_equal(a));
  CHECK_FALSE(a.is_equal(b));
  CHECK_FALSE(a.is_equal(*std::pmr::new_delete_resource()));
}

TEST_CASE("a pmr container can keep its elements in secure pages") {
  secure_page_resource r;
  {
    std::pmr::vector<std::uint64_t> v(&r);
    for (std::uint64_t i = 0; i < 10000; ++i) v.push_back(i * i);
    for (std::uint64_t i = 0; i < 10000; ++i) CHECK((v[i] == i * i));
    CHECK(r.stats().allocations == 1);
  }
  CHECK(r.stats().allocations == 0);
  CHECK(r.stats().bytes_mapped == 0);
}

TEST_CASE("several threads allocate and free secure pages at once") {
  secure_page_resource r;
  std::vector<std::thread> threads;
  std::vector<int> bad(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const std::size_t bytes = 16 + static_cast<std::size_t>(i * 37 % 9000);
        auto* p = static_cast<unsigned char*>(r.allocate(bytes));
        std::memset(p, t, bytes);
        if (p[0] != t || p[bytes - 1] != t) ++bad[static_cast<std::size_t>(t)];
        r.deallocate(p, bytes);
      }
    });
  for (auto& th : threads) th.join();
  CHECK(bad == std::vector<int>(4, 0));
  CHECK(r.stats().allocations == 0);
  CHECK(r.stats().total_allocations == 800);
  CHECK(r.stats().bytes_mapped == 0);
}

}  // TEST_SUITE("resources")
