// Stack capture with Boost.Stacktrace over libbacktrace: capture records return
// addresses only; file, line and function are looked up from the debug information
// when a report asks for them.
#define BOOST_STACKTRACE_USE_BACKTRACE
#include "call_stack.hpp"

#include <boost/stacktrace.hpp>

#include <dlfcn.h>

#include <string_view>

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

// Library frames: code in this shared object, or inline code from the standard
// library's, Boost's or memshuffle's headers (its test support aside).
bool library_frame(const void* address, const boost::stacktrace::frame& f) {
  static const void* const self = object_of(reinterpret_cast<const void*>(&capture_call_stack));
  if (self != nullptr && object_of(address) == self) return true;
  const std::string name = f.name();
  if (name.empty()) return true;
  for (std::string_view p : {"std::", "__gnu_cxx::", "boost::", "operator new", "__libc", "_start"})
    if (starts_with(name, p)) return true;
  if (starts_with(name, "memshuffle::") && !starts_with(name, "memshuffle::testing::")) return true;
  const std::string file = f.source_file();
  return file.find("/include/c++/") != std::string::npos;
}

}  // namespace

call_stack capture_call_stack() noexcept {
  call_stack s;
  s.size = boost::stacktrace::safe_dump_to(1, s.frames.data(), sizeof s.frames);
  return s;
}

frame_info first_user_frame(const call_stack& stack) {
  for (std::size_t i = 0; i < stack.size; ++i) {
    const boost::stacktrace::frame f(stack.frames[i]);
    if (library_frame(stack.frames[i], f)) continue;
    return frame_info{f.source_file(), f.source_line(), f.name()};
  }
  return {};
}

}  // namespace memshuffle::detail
