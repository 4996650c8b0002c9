#pragma once
// MEMSHUFFLE_ASSERT(condition, message): a precondition or invariant that a caller or
// the library itself could break. Checked (and, when broken, reported on stderr
// followed by std::abort) in builds with the meson option debug_checks, which defines
// MEMSHUFFLE_DEBUG_CHECKS; compiled out otherwise. For what a caller can get wrong at
// run time and recover from, the public contract throws instead.

namespace memshuffle::detail {
[[noreturn]] void assertion_failed(const char* condition, const char* message, const char* file,
                                   int line) noexcept;
}  // namespace memshuffle::detail

#ifdef MEMSHUFFLE_DEBUG_CHECKS
#define MEMSHUFFLE_ASSERT(condition, message)                                               \
  ((condition) ? static_cast<void>(0)                                                       \
               : ::memshuffle::detail::assertion_failed(#condition, message, __FILE__, __LINE__))
#else
#define MEMSHUFFLE_ASSERT(condition, message) static_cast<void>(sizeof(!(condition)))
#endif
