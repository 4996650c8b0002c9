#pragma once
// The lock around the shuffler's algorithm (shuffler_impl.hpp), kept apart from it as
// Boost's synchronized_pool_resource wraps its pool: one mutex guards the table, the
// heap, the key ring and the statistics, and a condition variable wakes the threads
// that wait for an entry in transition. Also the fork rule: in a child of fork() every
// call throws fork_error, and the shuffler is abandoned, untouched, when it ends there.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

#include <memshuffle/error.hpp>

#include "fork_epoch.hpp"
#include "shuffler_impl.hpp"

namespace memshuffle {

struct shuffler::synchronized {
  synchronized(const shuffler_options& o, const key_type* key, const salt_type* salt, std::pmr::memory_resource* up)
      : core(o, key, salt, up) {}

  // The lock, after the fork check.
  std::unique_lock<std::mutex> lock() const {
    if (forked()) throw fork_error("memshuffle: a shuffler of the parent process used in a child of fork()");
    std::unique_lock lk(m, std::defer_lock);
    relock(lk);
    return lk;
  }
  // Takes lk's lock (again). A thread that finds it taken counts itself in `waiting`
  // until it has it, so a long operation that releases it between parts can let such
  // threads go first. Every (re)locking goes through here: a lease that decrypted
  // outside the lock and relocked uncounted was passed over part after part (waits of
  // 40 to 160 ms during a full shuffle of 1 GiB, parts of at most 5 ms).
  void relock(std::unique_lock<std::mutex>& lk) const {
    if (lk.try_lock()) return;
    waiting.fetch_add(1, std::memory_order_relaxed);
    lk.lock();
    waiting.fetch_sub(1, std::memory_order_relaxed);
  }
  bool forked() const noexcept { return detail::fork_epoch() != epoch; }

  // Where pin() wants the work done: nowhere (nothing to do), here (under the lock: the
  // work is cheaper than unlocking, relocking and waking), or outside the lock.
  enum class work_at { nowhere, here, outside };
  work_at place(std::size_t bytes) const noexcept {
    return core.work_under_lock(bytes) ? work_at::here : work_at::outside;
  }

  // The one sequence of every cipher call on entries: pin() under the lock marks them
  // opening or sealing and says where the work goes; work() never throws; commit() runs
  // under the lock. Work done outside the lock wakes every thread waiting for an entry
  // in transition afterwards; work done here needs no wake, as no thread saw the entry
  // in transition.
  template <class Pin, class Work, class Commit>
  void transition(std::unique_lock<std::mutex>& lk, Pin&& pin, Work&& work, Commit&& commit) {
    const work_at at = pin();
    if (at == work_at::nowhere) return;
    if (at == work_at::here) {
      work();
      commit();
      return;
    }
    lk.unlock();
    work();
    relock(lk);
    const struct wake {
      std::condition_variable& cv;
      ~wake() { cv.notify_all(); }
    } waiters{cv};
    commit();
  }

  // A full shuffle a part at a time, the lock released between parts, so another
  // thread waits a part at most. One at a time: a second caller waits for the first.
  void shuffle_in_parts(std::unique_lock<std::mutex>& lk);

  rented rent(handle h, std::size_t size, std::size_t alignment);
  void give_back(std::unique_lock<std::mutex>& lk, handle h);
  void rotate(std::unique_lock<std::mutex>& lk, const key_type* key, const salt_type* salt);
  void maybe_rotate(std::unique_lock<std::mutex>& lk) noexcept;

  mutable std::mutex m;
  mutable std::atomic<int> waiting{0};  // threads blocked in lock()
  std::condition_variable cv;  // an entry left opening or sealing
  const std::uint64_t epoch = detail::fork_epoch();
  impl core;
};

}  // namespace memshuffle
