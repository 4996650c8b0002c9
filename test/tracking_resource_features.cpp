// tracking_resource's test-allocator features: leaks by call site, injected
// allocation failures, exact books across threads, one bad-alignment error.
#include <doctest/doctest.h>
#include <memshuffle/error.hpp>
#include <memshuffle/tracking_resource.hpp>

#include "test/support/recording_resource.hpp"

#include <atomic>
#include <memory_resource>
#include <new>
#include <string>
#include <thread>
#include <vector>

using memshuffle::tracking_options;
using memshuffle::tracking_resource;
using memshuffle::testing::recording_resource;

TEST_SUITE("resources") {

TEST_CASE("with capture_stacks, leaks are grouped by the line that allocated them") {
  recording_resource up;
  tracking_resource t({.capture_stacks = true}, &up);
  std::vector<void*> blocks;
  for (int i = 0; i < 3; ++i) blocks.push_back(t.allocate(40, 8));
  const int loop_line = __LINE__ - 1;
  void* other = t.allocate(24, 8);
  const int other_line = __LINE__ - 1;
  const auto sites = t.leak_sites();
  REQUIRE(sites.size() == 2);
  CHECK(sites[0].leaks == 3);
  CHECK(sites[0].bytes == 120);
  CHECK(sites[0].line == static_cast<std::size_t>(loop_line));
  CHECK(sites[0].file.find("tracking_resource_features.cpp") != std::string::npos);
  CHECK_FALSE(sites[0].function.empty());
  CHECK(sites[0].first_sequence == 1);
  CHECK(sites[1].leaks == 1);
  CHECK(sites[1].line == static_cast<std::size_t>(other_line));
  const std::string report = t.report();
  CAPTURE(report);
  CHECK(report.find("tracking_resource_features.cpp:" + std::to_string(loop_line)) !=
        std::string::npos);
  for (void* p : blocks) t.deallocate(p, 40, 8);
  t.deallocate(other, 24, 8);
  CHECK(t.leak_sites().empty());
}

TEST_CASE("without capture_stacks there are no call sites") {
  tracking_resource t;
  void* p = t.allocate(8, 8);
  CHECK(t.leak_sites().empty());
  t.deallocate(p, 8, 8);
}

TEST_CASE("fail_after makes exactly the n-th allocation from now throw, once, changing nothing") {
  recording_resource up;
  tracking_resource t(&up);
  t.fail_after(2);
  void* a = t.allocate(8, 8);
  void* b = t.allocate(8, 8);
  const auto before = t.stats();
  CHECK_THROWS_AS((void)t.allocate(8, 8), std::bad_alloc);
  auto after = t.stats();
  CHECK(after.injected_failures == 1);
  after.injected_failures = 0;
  CHECK(after.total_allocations == before.total_allocations);
  CHECK(after.current_bytes == before.current_bytes);
  CHECK(up.allocations() == 2);
  void* c = t.allocate(8, 8);  // once only
  t.fail_after(0);
  t.fail_never();
  void* d = t.allocate(8, 8);
  for (void* p : {a, b, c, d}) t.deallocate(p, 8, 8);
  CHECK(t.stats().injected_failures == 1);
}

TEST_CASE("an alignment that is not a power of two is bad_alignment and reaches nothing") {
  recording_resource up;
  tracking_resource t(&up);
  CHECK_THROWS_AS((void)t.allocate(8, 3), memshuffle::bad_alignment);
  CHECK_THROWS_AS((void)t.allocate(8, 0), std::bad_alloc);
  CHECK(up.allocations() == 0);
  CHECK(t.stats().total_allocations == 0);
}

TEST_CASE("an upstream not known to be thread safe is called under a lock unless the options say it is") {
  // An unsynchronized pool behind two threads: it would be corrupted without the lock.
  std::pmr::unsynchronized_pool_resource pool;
  tracking_resource t(&pool);
  std::vector<std::thread> threads;
  for (int k = 0; k < 2; ++k)
    threads.emplace_back([&] {
      std::vector<void*> v;
      for (int i = 0; i < 20000; ++i) {
        v.push_back(t.allocate(32, 8));
        if (i % 2) {
          t.deallocate(v.back(), 32, 8);
          v.pop_back();
        }
      }
      for (void* p : v) t.deallocate(p, 32, 8);
    });
  for (auto& th : threads) th.join();
  CHECK_FALSE(t.has_leaks());
  CHECK(t.stats().bad_deallocations == 0);
}

}  // TEST_SUITE

TEST_SUITE("concurrency") {

TEST_CASE("across threads the sequence numbers are unique, the peak exact, and a block freed by another thread is found") {
  recording_resource up;
  tracking_resource t(std::pmr::new_delete_resource());
  constexpr int threads = 2, blocks = 5000;
  std::vector<std::vector<void*>> made(threads);
  std::atomic<int> ready{0};
  std::vector<std::thread> pool;
  for (int k = 0; k < threads; ++k)
    pool.emplace_back([&, k] {
      ++ready;
      while (ready < threads) {
      }
      for (int i = 0; i < blocks; ++i) made[static_cast<std::size_t>(k)].push_back(t.allocate(16, 8));
    });
  for (auto& th : pool) th.join();
  const auto live = t.live_allocations();
  REQUIRE(live.size() == threads * blocks);
  for (std::size_t i = 0; i < live.size(); ++i) CHECK(live[i].sequence == i + 1);
  CHECK(t.stats().peak_bytes == threads * blocks * 16);
  CHECK(t.stats().peak_allocations == threads * blocks);
  // Each thread frees the other's blocks.
  pool.clear();
  for (int k = 0; k < threads; ++k)
    pool.emplace_back([&, k] {
      for (void* p : made[static_cast<std::size_t>(1 - k)]) t.deallocate(p, 16, 8);
    });
  for (auto& th : pool) th.join();
  const auto st = t.stats();
  CHECK(st.current_allocations == 0);
  CHECK(st.current_bytes == 0);
  CHECK(st.bad_deallocations == 0);
  CHECK(st.total_deallocations == threads * blocks);
  CHECK(st.peak_bytes == threads * blocks * 16);
}

// Threads wait for each other at every step, so what is live at once is known.
class step_barrier {
 public:
  explicit step_barrier(int threads) : threads_(threads) {}
  void arrive_and_wait() {
    const int gen = generation_.load();
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++generation_;
    } else {
      while (generation_.load() == gen) std::this_thread::yield();
    }
  }

 private:
  const int threads_;
  std::atomic<int> arrived_{0}, generation_{0};
};

TEST_CASE("across threads the peak is the highest sum live at once, not the sum of each thread's highest") {
  tracking_resource t(std::pmr::new_delete_resource());
  constexpr int threads = 4;
  constexpr std::size_t rounds[] = {3, 7, 2, 5};  // the second is the highest
  step_barrier barrier(threads);
  std::vector<std::thread> pool;
  for (int k = 0; k < threads; ++k)
    pool.emplace_back([&, k] {
      for (std::size_t r : rounds) {
        std::vector<void*> mine;
        for (std::size_t i = 0; i < r * static_cast<std::size_t>(k + 1); ++i) mine.push_back(t.allocate(8 * r, 8));
        barrier.arrive_and_wait();  // all live here
        for (void* p : mine) t.deallocate(p, 8 * r, 8);
        barrier.arrive_and_wait();
      }
      // Each in turn alone, 50 blocks (3000 bytes): below the peak, though the four
      // together (200 blocks) would be far above it.
      for (int turn = 0; turn < threads; ++turn) {
        if (turn == k) {
          std::vector<void*> mine;
          for (int i = 0; i < 50; ++i) mine.push_back(t.allocate(60, 4));
          for (void* p : mine) t.deallocate(p, 60, 4);
        }
        barrier.arrive_and_wait();
      }
    });
  for (auto& th : pool) th.join();
  const auto st = t.stats();
  constexpr std::size_t blocks_at_peak = 7 * (1 + 2 + 3 + 4);
  CHECK(st.peak_allocations == blocks_at_peak);
  CHECK(st.peak_bytes == blocks_at_peak * 8 * 7);
  CHECK(st.current_allocations == 0);
  CHECK(st.total_allocations == (3 + 7 + 2 + 5) * 10 + 50 * threads);
}

}  // TEST_SUITE
