// tracking_resource's lock, on its own.
#include <doctest/doctest.h>

#include "lib/spin_lock.hpp"

#include <thread>
#include <vector>

using memshuffle::detail::lock_if;
using memshuffle::detail::spin_lock;

TEST_SUITE("concurrency") {

TEST_CASE("a spin lock makes increments from several threads exact") {
  spin_lock lock;
  long counter = 0;  // plain: only the lock protects it
  constexpr int threads = 4, rounds = 50000;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      for (int i = 0; i < rounds; ++i) {
        lock_if l(lock, true);
        ++counter;
      }
    });
  for (auto& th : pool) th.join();
  CHECK(counter == threads * rounds);
}

TEST_CASE("lock_if locks only when enabled and unlocks when it ends") {
  spin_lock lock;
  {
    lock_if off(lock, false);
    lock_if on(lock, true);  // would deadlock if off had locked
  }
  lock_if again(lock, true);  // would deadlock if on had not unlocked
}

}  // TEST_SUITE
