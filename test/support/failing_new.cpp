#include "failing_new.hpp"

#include <atomic>
#include <cstdlib>
#include <new>

namespace memshuffle::testing::failing_new {
namespace {

std::atomic<long> countdown{-1};  // -1: never fail
std::atomic<std::size_t> refused_from{0};
std::atomic<long> injected{0};

bool should_fail(std::size_t n) noexcept {
  const std::size_t limit = refused_from.load(std::memory_order_relaxed);
  if (limit != 0 && n >= limit) {
    ++injected;
    return true;
  }
  if (countdown.load(std::memory_order_relaxed) >= 0 && countdown.fetch_sub(1, std::memory_order_relaxed) == 0) {
    countdown.store(-1);
    ++injected;
    return true;
  }
  return false;
}

// Out of line, so the compiler does not pair free() with operator new and object.
[[gnu::noinline]] void* checked_malloc(std::size_t n, std::size_t alignment) {
  if (should_fail(n)) throw std::bad_alloc();
  if (n == 0) n = 1;
  void* p = alignment <= alignof(std::max_align_t)
                ? std::malloc(n)
                : std::aligned_alloc(alignment, (n + alignment - 1) / alignment * alignment);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
[[gnu::noinline]] void release(void* p) noexcept { std::free(p); }

}  // namespace

void fail_at(long n) noexcept { countdown.store(n); }
void refuse_from(std::size_t bytes) noexcept { refused_from.store(bytes); }
long failures() noexcept { return injected.load(); }

}  // namespace memshuffle::testing::failing_new

void* operator new(std::size_t n) { return memshuffle::testing::failing_new::checked_malloc(n, 0); }
void* operator new[](std::size_t n) { return memshuffle::testing::failing_new::checked_malloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return memshuffle::testing::failing_new::checked_malloc(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return memshuffle::testing::failing_new::checked_malloc(n, static_cast<std::size_t>(a)); }
void operator delete(void* p) noexcept { memshuffle::testing::failing_new::release(p); }
void operator delete[](void* p) noexcept { memshuffle::testing::failing_new::release(p); }
void operator delete(void* p, std::size_t) noexcept { memshuffle::testing::failing_new::release(p); }
void operator delete[](void* p, std::size_t) noexcept { memshuffle::testing::failing_new::release(p); }
void operator delete(void* p, std::align_val_t) noexcept { memshuffle::testing::failing_new::release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { memshuffle::testing::failing_new::release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { memshuffle::testing::failing_new::release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { memshuffle::testing::failing_new::release(p); }
