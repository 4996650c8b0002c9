// secret_backend: what each backend hands out, through the pool: smaps flags, a read
// through /proc/self/mem, a fork child, the automatic choice and its report, the lock
// budget under fail and degrade, and a refused kernel call at every point.
#include <doctest/doctest.h>

#include <memshuffle/secret_pool_resource.hpp>
#include <test/support/child_process.hpp>
#include <test/support/secret_backends.hpp>
#include <test/support/smaps.hpp>

#include "lib/secret_pages.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <new>
#include <string>
#include <vector>

using namespace memshuffle;
using namespace memshuffle::testing;

namespace {

const std::size_t page = detail::page_size();

// Reads n bytes at p through /proc/self/mem, as a debugger or another process would.
bool readable_through_proc_mem(const void* p, std::size_t n) {
  const int fd = ::open("/proc/self/mem", O_RDONLY);
  if (fd < 0) return false;
  std::vector<char> out(n);
  const auto got = ::pread(fd, out.data(), n, static_cast<off_t>(address_of(p)));
  ::close(fd);
  return got == static_cast<ssize_t>(n);
}

}  // namespace

TEST_SUITE("resources") {

TEST_CASE("the automatic backend reports secret memory where the kernel has it, else a fallback") {
  secret_pool_resource pool;
  const auto r = pool.report();
  CHECK(r.backend == (have_secret_memory ? secret_backend::secret_memory : secret_backend::locked_pages));
  CHECK(r.degraded == !have_secret_memory);
  CHECK(r.fallbacks == (have_secret_memory ? 0u : 1u));
  CHECK(r.in_fork_child == (have_secret_memory ? fork_behaviour::absent : fork_behaviour::zeroed));
  CHECK(r.locked);
  CHECK(r.excluded_from_dumps);
  CHECK(r.guard_pages);
  CHECK(std::string(to_string(r.backend)) == (have_secret_memory ? "secret_memory" : "locked_pages"));
}

TEST_CASE("asking for locked pages gives locked pages, not degraded") {
  secret_pool_resource pool({.backend = secret_backend::locked_pages});
  const auto r = pool.report();
  CHECK(r.backend == secret_backend::locked_pages);
  CHECK(r.in_fork_child == fork_behaviour::zeroed);
  CHECK_FALSE(r.degraded);
}

TEST_CASE("every page each backend hands out is locked and left out of core dumps") {
  for (auto backend : backends()) {
    const std::string backend_name = to_string(backend);
    CAPTURE(backend_name);
    secret_pool_resource pool({.backend = backend, .run_pages = 4});
    void* small = pool.allocate(48);
    void* large = pool.allocate(3 * page);
    for (void* p : {small, large, static_cast<void*>(static_cast<char*>(large) + 2 * page)}) {
      INFO(vm_flags(p));
      // The sanitizers make mlock a no-op that reports success.
      if (mlock_is_real || backend == secret_backend::secret_memory) CHECK(has_flag(p, "lo"));
      CHECK(has_flag(p, "dd"));
      // Not in a fork child: no mapping (secret memory) or zeros (locked pages).
      CHECK(has_flag(p, backend == secret_backend::secret_memory ? "dc" : "wf"));
    }
    CHECK(pool.stats().bytes_locked == pool.options().run_pages * page + 3 * page);
    pool.deallocate(small, 48);
    pool.deallocate(large, 3 * page);
  }
}

TEST_CASE("a secret memory page cannot be read through /proc/self/mem while the process reads it" *
          doctest::skip(!have_secret_memory)) {
  secret_pool_resource secret({.backend = secret_backend::secret_memory});
  secret_pool_resource locked({.backend = secret_backend::locked_pages});
  auto* s = static_cast<char*>(secret.allocate(64));
  auto* l = static_cast<char*>(locked.allocate(64));
  std::memset(s, 'k', 64);
  std::memset(l, 'k', 64);
  CHECK(s[63] == 'k');
  CHECK_FALSE(readable_through_proc_mem(s, 64));
  CHECK(readable_through_proc_mem(l, 64));   // the control: ordinary memory reads fine
  secret.deallocate(s, 64);
  locked.deallocate(l, 64);
}

TEST_CASE("a fork child finds no mapping or zeros, frees the parent's blocks harmlessly and allocates anew") {
  for (auto backend : backends()) {
    const std::string backend_name = to_string(backend);
    CAPTURE(backend_name);
    secret_pool_resource pool({.backend = backend});
    auto* small = static_cast<unsigned char*>(pool.allocate(32));
    auto* large = static_cast<unsigned char*>(pool.allocate(2 * page));
    std::memset(small, 0x77, 32);
    std::memset(large, 0x77, 2 * page);
    const int status = run_in_child([&] {
      const bool gone = backend == secret_backend::secret_memory
                            ? !mapped(small) && !mapped(large)
                            : all_zero(small, 32) && all_zero(large, 2 * page);
      pool.deallocate(small, 32);
      pool.deallocate(large, 2 * page);
      auto* fresh = static_cast<unsigned char*>(pool.allocate(32));
      std::memset(fresh, 1, 32);
      const auto s = pool.stats();
      const bool fresh_ok = fresh[31] == 1 && s.blocks == 1 && s.forked_blocks == 2 &&
                            s.bad_deallocations == 0 && address_of(fresh) != address_of(small);
      pool.deallocate(fresh, 32);
      return gone && fresh_ok;
    });
    INFO("child " << describe(status));
    CHECK(exited_with(status, 0));
    CHECK(small[31] == 0x77);   // the parent's blocks are untouched
    CHECK(large[2 * page - 1] == 0x77);
    pool.deallocate(small, 32);
    pool.deallocate(large, 2 * page);
  }
}

// Runs check(backend) for each backend in a child without CAP_IPC_LOCK whose
// RLIMIT_MEMLOCK is 0, so every lock and every secret mapping is refused.
template <class F>
void for_each_backend_without_lock_budget(F check) {
  for (auto backend : backends()) {
    const std::string backend_name = to_string(backend);
    CAPTURE(backend_name);
    const int status = run_in_child([&] { return limit_memlock(0) && check(backend); });
    INFO("child " << describe(status));
    CHECK(exited_with(status, 0));
  }
}

TEST_CASE("under fail a refused lock throws a bad_alloc and changes nothing" *
          doctest::skip(!mlock_is_real)) {
  for_each_backend_without_lock_budget([](secret_backend backend) {
    secret_pool_resource pool({.backend = backend});
    bool threw = false;
    try {
      (void)pool.allocate(64);
    } catch (const secret_memory_refused& e) {
      threw = std::string(e.what()).find("memshuffle") != std::string::npos;
    }
    const auto s = pool.stats();
    const auto r = pool.report();
    return threw && s.runs == 0 && s.bytes_mapped == 0 && s.total_allocations == 0 &&
           !r.degraded && r.lock_refusals == 0;
  });
}

TEST_CASE("under degrade a refused lock gives unlocked pages, counted and reported" *
          doctest::skip(!mlock_is_real)) {
  for_each_backend_without_lock_budget([](secret_backend backend) {
    secret_pool_resource pool({.backend = backend, .lock_refused = on_lock_refused::degrade});
    auto* p = static_cast<char*>(pool.allocate(64));
    std::memset(p, 9, 64);
    const auto r = pool.report();
    const bool reported = r.degraded && !r.locked && r.lock_refusals == 1 &&
                          pool.stats().bytes_locked == 0 && has_flag(p, "dd") &&
                          has_flag(p, "wf") && !has_flag(p, "lo");
    pool.deallocate(p, 64);
    return reported && p[0] == 0 && pool.report().lock_refusals == 1;
  });
}

// Allocates a pooled block (a new run) and a large block with the n-th kernel call
// refused; true when the refusal fired. Checks that a failure left no trace and that
// the pool works on exactly as before.
bool allocate_with_refusal(secret_backend backend, on_lock_refused policy, long n) {
  secret_pool_resource pool({.backend = backend, .lock_refused = policy, .run_pages = 4});
  auto* keep = static_cast<unsigned char*>(pool.allocate(16));
  std::memset(keep, 5, 16);
  detail::inject_page_fault(n);
  void* small = nullptr;
  void* large = nullptr;
  try {
    small = pool.allocate(256);
    large = pool.allocate(2 * page);
  } catch (const std::bad_alloc&) {
  }
  const bool fired = detail::page_fault_countdown() < 0;
  detail::inject_page_fault(-1);
  const auto s = pool.stats();
  CHECK(s.blocks == (small != nullptr ? 2u : 1u));
  CHECK(s.large_allocations == (large != nullptr ? 1u : 0u));
  CHECK(s.runs == (small != nullptr ? 2u : 1u));
  CHECK(s.bytes_mapped == s.runs * (pool.options().run_pages + 2) * page +
                              (large != nullptr ? 4 * page : 0));
  if (small != nullptr) pool.deallocate(small, 256);
  if (large != nullptr) pool.deallocate(large, 2 * page);
  void* again = pool.allocate(256);
  void* big = pool.allocate(2 * page);
  pool.deallocate(again, 256);
  pool.deallocate(big, 2 * page);
  CHECK(keep[15] == 5);
  pool.deallocate(keep, 16);
  CHECK(pool.stats().blocks == 0);
  CHECK(pool.stats().bad_deallocations == 0);
  return fired;
}

TEST_CASE("a refused mmap or mlock at every point leaves the pool consistent") {
  for (auto backend : backends()) {
    for (auto policy : {on_lock_refused::fail, on_lock_refused::degrade}) {
      const std::string backend_name = to_string(backend);
    CAPTURE(backend_name);
      CAPTURE(static_cast<int>(policy));
      long point = 0;
      while (point < 40 && allocate_with_refusal(backend, policy, point)) ++point;
      CHECK(point >= 4);    // the run and the large block each take several calls
      CHECK(point < 40);    // and the refusal point was passed
    }
  }
}

}  // TEST_SUITE("resources")
