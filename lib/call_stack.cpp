// Stack capture with Boost.Stacktrace over libbacktrace: capture records return
// addresses only; file, line and function are looked up from the debug information
// when a report asks for them.
#if __has_include(<backtrace.h>)  // gcc ships it; clang does not see it
#define BOOST_STACKTRACE_USE_BACKTRACE
#else  // the same frame functions, compiled into libboost_stacktrace_backtrace
#define BOOST_STACKTRACE_LINK
#endif
#include "call_stack.hpp"

#include <boost/core/demangle.hpp>
#include <boost/stacktrace.hpp>

#include <dlfcn.h>

#include <cstdint>
#include <string_view>
#include <vector>

// libbacktrace, which Boost.Stacktrace symbolizes with, also names the inline
// functions at an address (Boost's frame names only the innermost): an allocation
// inlined into user code has the user's line one level out.
#if __has_include(<backtrace.h>)
#include <backtrace.h>
#define MEMSHUFFLE_INLINE_FRAMES 1
#else
#define MEMSHUFFLE_INLINE_FRAMES 0
#endif

namespace memshuffle::detail {

namespace {

// The shared object a code address lies in, or null.
const void* object_of(const void* address) noexcept {
  Dl_info info{};
  return dladdr(address, &info) != 0 ? info.dli_fbase : nullptr;
}

bool starts_with(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

bool in_this_library(const void* address) {
  static const void* const self = object_of(reinterpret_cast<const void*>(&capture_call_stack));
  return self != nullptr && object_of(address) == self;
}

// Library code: the standard library's, Boost's or memshuffle's (its test support aside).
bool library_function(const frame_info& f) {
  if (f.function.empty()) return true;
  for (std::string_view p : {"std::", "__gnu_cxx::", "boost::", "operator new", "__libc", "_start"})
    if (starts_with(f.function, p)) return true;
  if (starts_with(f.function, "memshuffle::") && !starts_with(f.function, "memshuffle::testing::"))
    return true;
  return f.file.find("/include/c++/") != std::string::npos;
}

#if MEMSHUFFLE_INLINE_FRAMES
backtrace_state* symbols() {
  static backtrace_state* const state =
      backtrace_create_state(nullptr, 1, [](void*, const char*, int) {}, nullptr);
  return state;
}

// The functions at pc, innermost (inlined) first.
std::vector<frame_info> levels(std::uintptr_t pc) {
  std::vector<frame_info> out;
  backtrace_pcinfo(
      symbols(), pc,
      [](void* data, std::uintptr_t, const char* file, int line, const char* function) {
        static_cast<std::vector<frame_info>*>(data)->push_back(
            {file ? file : "", static_cast<std::size_t>(line > 0 ? line : 0),
             function ? boost::core::demangle(function) : ""});
        return 0;
      },
      [](void*, const char*, int) {}, &out);
  return out;
}
#else
std::vector<frame_info> levels(std::uintptr_t pc) {
  const boost::stacktrace::frame f(reinterpret_cast<const void*>(pc));
  return {frame_info{f.source_file(), f.source_line(), f.name()}};
}
#endif

}  // namespace

call_stack capture_call_stack() noexcept {
  call_stack s;
  s.size = boost::stacktrace::safe_dump_to(1, s.frames.data(), sizeof s.frames);
  return s;
}

frame_info first_user_frame(const call_stack& stack) {
  for (std::size_t i = 0; i < stack.size; ++i) {
    if (in_this_library(stack.frames[i])) continue;
    // A return address: the call is the instruction before it.
    for (auto& f : levels(reinterpret_cast<std::uintptr_t>(stack.frames[i]) - 1))
      if (!library_function(f)) return f;
  }
  return {};
}

}  // namespace memshuffle::detail
