#pragma once
// The library's own secret memory: where keys, key schedules, salts and plaintext
// windows live (docs/security.md, "Custody"). Every part of the library that holds a
// secret takes its memory from here, never from the heap.
#include <memory_resource>

namespace memshuffle::detail {

// The process-wide secret memory resource. Never destroyed, so objects with static
// storage duration may still give memory back to it at exit. Thread safe.
std::pmr::memory_resource* secret_memory() noexcept;

}  // namespace memshuffle::detail
