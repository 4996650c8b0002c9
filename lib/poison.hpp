#pragma once
// Marks memory the code must no longer touch, so that the address sanitizer reports a
// stale pointer where it is used. Without the sanitizer these compile to nothing.
#include <cstddef>

#include <memshuffle/detail/sanitizers.hpp>
#ifdef MEMSHUFFLE_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace memshuffle::detail {

inline void poison(const void* p, std::size_t n) noexcept {
#ifdef MEMSHUFFLE_ASAN
  ASAN_POISON_MEMORY_REGION(p, n);
#else
  (void)p, (void)n;
#endif
}

inline void unpoison(const void* p, std::size_t n) noexcept {
#ifdef MEMSHUFFLE_ASAN
  ASAN_UNPOISON_MEMORY_REGION(p, n);
#else
  (void)p, (void)n;
#endif
}

}  // namespace memshuffle::detail
