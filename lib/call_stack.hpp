#pragma once
// Internal to tracking_resource: the stack of an allocation, captured as raw return
// addresses (cheap enough for every allocation) and symbolized only for a report.
#include <array>
#include <cstddef>
#include <string>

namespace memshuffle::detail {

struct call_stack {
  static constexpr std::size_t depth = 32;
  std::array<void*, depth> frames{};
  std::size_t size = 0;
};

/// \returns The calling thread's stack, innermost frame first.
call_stack capture_call_stack() noexcept;

struct frame_info {
  std::string file;
  std::size_t line = 0;
  std::string function;
};

/// \returns The first frame of `stack` outside memshuffle and the standard library:
/// where user code asked for the memory. Empty when there is none.
frame_info first_user_frame(const call_stack& stack);

}  // namespace memshuffle::detail
