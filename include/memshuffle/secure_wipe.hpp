#pragma once
// Wiping secrets. Every place in memshuffle that clears memory that held a secret goes
// through this, so that no compiler removes the clearing as a dead store.
#include <cstddef>

namespace memshuffle {

/// \effects Overwrites the `n` bytes at `p` with zeros in a way the compiler may not
///          remove. `p` may be null when `n` is 0.
void secure_wipe(void* p, std::size_t n) noexcept;

}  // namespace memshuffle
