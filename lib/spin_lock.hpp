#pragma once
// Internal to tracking_resource: the lock of each shard of its books, and of an
// upstream that is not thread safe.
#include <atomic>
#include <thread>
#if __has_include(<sys/single_threaded.h>)
#include <sys/single_threaded.h>
#define MEMSHUFFLE_SINGLE_THREADED_FLAG 1
#else
#define MEMSHUFFLE_SINGLE_THREADED_FLAG 0
#endif

namespace memshuffle::detail {

// True while the process has one thread (glibc's __libc_single_threaded); then no
// other thread can see a plain load and store in place of an atomic read-modify-write.
inline bool process_single_threaded() noexcept {
#if MEMSHUFFLE_SINGLE_THREADED_FLAG
  return __libc_single_threaded;
#else
  return false;
#endif
}

// While the process has a single thread (glibc's __libc_single_threaded, which only
// ever goes from true to false, and only when this thread starts another), taking
// the lock needs no atomic read-modify-write: glibc's own mutex and malloc skip theirs
// the same way, and a locked instruction costs as much as half an allocation. Once
// threads exist it is one atomic exchange to lock and a plain store to unlock
// (std::mutex: two atomic read-modify-writes and two calls into libc). The critical
// sections are short (a few table operations and the upstream call), so a waiter
// spins briefly, then yields its core (on a loaded machine the holder may be
// preempted, or the upstream may be in a system call).
class spin_lock {
 public:
  // Blocks until the lock is taken.
  void lock() noexcept {
    if (process_single_threaded() && !locked_.load(std::memory_order_relaxed)) {
      locked_.store(true, std::memory_order_relaxed);
      return;
    }
    if (!locked_.exchange(true, std::memory_order_acquire)) [[likely]]
      return;
    wait();
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  [[gnu::noinline]] void wait() noexcept {
    for (int spins = 0;; ++spins) {
      if (!locked_.load(std::memory_order_relaxed) &&
          !locked_.exchange(true, std::memory_order_acquire))
        return;
      if (spins < 100) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
  std::atomic<bool> locked_{false};
};

// Locks only when enabled (a resource that is thread safe, an upstream that is not).
class lock_if {
 public:
  lock_if(spin_lock& l, bool enabled) noexcept : lock_(enabled ? &l : nullptr) {
    if (lock_) lock_->lock();
  }
  lock_if(const lock_if&) = delete;
  lock_if& operator=(const lock_if&) = delete;
  ~lock_if() {
    if (lock_) lock_->unlock();
  }

 private:
  spin_lock* lock_;
};

}  // namespace memshuffle::detail
