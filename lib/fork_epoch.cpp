#include "fork_epoch.hpp"

#include <pthread.h>

#include <atomic>

namespace memshuffle::detail {

namespace {

std::atomic<std::uint64_t> epoch{0};

void in_child() noexcept { epoch.fetch_add(1, std::memory_order_relaxed); }

// Registered when the library is loaded, before any object can record an epoch.
const int registered = ::pthread_atfork(nullptr, nullptr, &in_child);

}  // namespace

std::uint64_t fork_epoch() noexcept {
  (void)registered;
  return epoch.load(std::memory_order_relaxed);
}

}  // namespace memshuffle::detail
