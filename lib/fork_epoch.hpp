#pragma once
// Which side of a fork() this process is on. A pthread_atfork child handler bumps the
// epoch in every child, so an object that records the epoch it was made in knows, with
// one relaxed load, that it now lives in a child that must not use its keys or its
// secret memory (docs/security.md, "Fork").
#include <cstdint>

namespace memshuffle::detail {

// 0 in the process that loaded the library; one more in each generation of children.
std::uint64_t fork_epoch() noexcept;

}  // namespace memshuffle::detail
