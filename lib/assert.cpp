#include <memshuffle/detail/assert.hpp>

#include <cstdio>
#include <cstdlib>

namespace memshuffle::detail {

// Defined in every build, so a program built with debug_checks links against a library
// built without them.
[[noreturn]] void assertion_failed(const char* condition, const char* message, const char* file,
                                   int line) noexcept {
  std::fprintf(stderr, "memshuffle: %s:%d: %s (%s)\n", file, line, message, condition);
  std::abort();
}

}  // namespace memshuffle::detail
