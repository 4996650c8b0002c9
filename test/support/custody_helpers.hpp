#pragma once
// Pieces the custody tests share: a filled shuffler, the check that a scan found none
// of the secrets, raw snapshots of what an upstream holds (to find where an entry's
// ciphertext lies), and stopping a thread at a random point with its signal frame kept
// where the scan cannot see it.
#include <doctest/doctest.h>
#include <pthread.h>
#include <signal.h>

#include <memshuffle/shuffler.hpp>
#include <test/support/custody_secrets.hpp>
#include <test/support/memory_scan.hpp>
#include <test/support/recording_resource.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

namespace memshuffle::testing {

inline constexpr std::size_t filled_entries = 10'000;

struct filled_shuffler {
  std::unique_ptr<shuffler> s;
  std::vector<handle> handles;  // entry i holds number i
};

// 10,000 entries of 16 to 512 bytes, every lease returned; and when large is set, one
// more entry of 4 MiB (number filled_entries), larger than any batch of a rotation.
inline filled_shuffler fill(const custody_secrets& k, cipher_kind c, std::uint64_t seed,
                            std::pmr::memory_resource* upstream = std::pmr::get_default_resource(),
                            std::pmr::memory_resource* plaintext = nullptr, bool large = false) {
  std::mt19937_64 rng(seed);
  filled_shuffler f{k.make(c, upstream, plaintext), {}};
  f.handles.reserve(filled_entries + 1);
  for (std::uint32_t i = 0; i < filled_entries; ++i) {
    f.handles.push_back(f.s->alloc<std::byte>(16 * (1 + rng() % 32)));
    k.write_entry(*f.s, f.handles.back(), i);
  }
  if (large) {
    f.handles.push_back(f.s->alloc<std::byte>(std::size_t{4} << 20));
    k.write_entry(*f.s, f.handles.back(), filled_entries);
  }
  return f;
}

inline bool every_item(const std::string&) { return true; }

// Every item counted and printed; each that must_be_zero names must be zero, and every
// mapping a dump would write must have been read.
inline void check_clean(const scan_report& r, bool (*must_be_zero)(const std::string&) = every_item) {
  MESSAGE(r.summary());
  bool found = false;
  for (const scan_item& item : r.items) found = found || (item.count != 0 && must_be_zero(item.name));
  if (found) MESSAGE("where they are:\n", r.where());
  for (const scan_item& item : r.items) {
    if (!must_be_zero(item.name)) continue;
    CHECK_MESSAGE(item.count == 0, item.name, " found ", item.count, " times outside secret memory");
  }
  const auto unreadable = r.unexpected_unreadable();
  CHECK_MESSAGE(unreadable.empty(), unreadable.size(), " mappings could not be read, the first: ",
                unreadable.empty() ? std::string() : unreadable.front());
}

// Reads memory the library may have poisoned for the address sanitizer on purpose.
#if defined(__GNUC__)
__attribute__((no_sanitize_address))
#endif
inline void raw_copy_to(std::byte* out, const void* p, std::size_t n) {
  auto* src = static_cast<const volatile std::byte*>(p);
  for (std::size_t i = 0; i < n; ++i) out[i] = src[i];
}

// A copy on the heap, wiped when it ends: it may hold an entry's plaintext.
struct wiped_copy {
  std::vector<std::byte> bytes;
  wiped_copy(const void* p, std::size_t n) : bytes(n) { raw_copy_to(bytes.data(), p, n); }
  ~wiped_copy() { secure_wipe(bytes.data(), bytes.size()); }
  wiped_copy(const wiped_copy&) = delete;
  wiped_copy& operator=(const wiped_copy&) = delete;
};

// Where an entry's bytes lie in its upstream's blocks: the first byte that a change of
// the entry changed, over a few changes.
struct located {
  const std::byte* p = nullptr;
};

template <class Change>
located locate(const recording_resource& upstream, Change&& change, int times = 3) {
  located at;
  for (int t = 0; t < times; ++t) {
    const auto blocks = upstream.live_blocks();
    std::vector<std::unique_ptr<wiped_copy>> before;
    for (const auto& b : blocks) before.push_back(std::make_unique<wiped_copy>(b.p, b.bytes));
    change(t);
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      const wiped_copy after(blocks[i].p, blocks[i].bytes);
      const auto diff = std::mismatch(after.bytes.begin(), after.bytes.end(), before[i]->bytes.begin());
      if (diff.first == after.bytes.end()) continue;
      const std::byte* q = static_cast<const std::byte*>(blocks[i].p) + (diff.first - after.bytes.begin());
      if (at.p == nullptr || q < at.p) at.p = q;
    }
  }
  return at;
}

inline std::atomic<bool> stopper_stopped{false}, stopper_resume{false};
inline std::atomic<int> stopper_timeouts{0};

// Stops a thread where it is (a signal whose handler waits on an alternate stack in a
// MADV_DONTDUMP mapping, so the registers the kernel saves there are not scanned),
// until resume(). The handler gives up after 20 s, so a scan that waits for a lock the
// stopped thread holds cannot hang.
class thread_stopper {
 public:
  thread_stopper() {
    struct sigaction sa {};
    sa.sa_handler = &on_signal;
    sa.sa_flags = SA_ONSTACK;
    ::sigemptyset(&sa.sa_mask);
    ::sigaction(SIGUSR1, &sa, &old_);
  }
  ~thread_stopper() { ::sigaction(SIGUSR1, &old_, nullptr); }
  thread_stopper(const thread_stopper&) = delete;
  thread_stopper& operator=(const thread_stopper&) = delete;

  // Called on the thread to be stopped, before it may be: its alternate signal stack.
  static void prepare_this_thread(hidden_bytes& stack) {
    stack_t ss{};
    ss.ss_sp = stack.data();
    ss.ss_size = stack.size();
    ::sigaltstack(&ss, nullptr);
  }
  static void forget_this_thread() {
    stack_t ss{};
    ss.ss_flags = SS_DISABLE;
    ::sigaltstack(&ss, nullptr);
  }

  // True when the thread stopped within a second.
  bool stop(std::thread& t) {
    resume_flag().store(false);
    ::pthread_kill(t.native_handle(), SIGUSR1);
    for (int i = 0; i < 10'000 && !stopped_flag().load(); ++i) std::this_thread::sleep_for(std::chrono::microseconds(100));
    return stopped_flag().load();
  }
  void resume() {
    resume_flag().store(true);
    while (stopped_flag().load()) std::this_thread::yield();
  }

 private:
  // Plain atomics at namespace scope: the handler may touch nothing lazily initialised.
  static std::atomic<bool>& stopped_flag() { return stopper_stopped; }
  static std::atomic<bool>& resume_flag() { return stopper_resume; }
  static void on_signal(int) {
    stopped_flag().store(true);
    timespec start{}, now{};
    ::clock_gettime(CLOCK_MONOTONIC, &start);
    while (!resume_flag().load()) {
      timespec nap{0, 100'000};
      ::nanosleep(&nap, nullptr);
      ::clock_gettime(CLOCK_MONOTONIC, &now);
      if (now.tv_sec - start.tv_sec > 20) {
        stopper_timeouts.fetch_add(1);
        break;
      }
    }
    stopped_flag().store(false);
  }

  struct sigaction old_ {};
};

}  // namespace memshuffle::testing
