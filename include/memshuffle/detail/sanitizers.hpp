#pragma once
// Which sanitizer a translation unit is built with, for gcc (__SANITIZE_*__) and clang
// (__has_feature) alike. Everything that behaves differently under a sanitizer asks here.
#if defined(__SANITIZE_ADDRESS__)
#define MEMSHUFFLE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MEMSHUFFLE_ASAN 1
#endif
#endif

#if defined(__SANITIZE_THREAD__)
#define MEMSHUFFLE_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MEMSHUFFLE_TSAN 1
#endif
#endif

namespace memshuffle::detail {

#ifdef MEMSHUFFLE_ASAN
inline constexpr bool address_sanitizer = true;
#else
inline constexpr bool address_sanitizer = false;
#endif
#ifdef MEMSHUFFLE_TSAN
inline constexpr bool thread_sanitizer = true;
#else
inline constexpr bool thread_sanitizer = false;
#endif

}  // namespace memshuffle::detail
