#pragma once
// Random bytes from the operating system's generator: keys, salts and layout seeds.
#include <cstddef>
#include <span>

namespace memshuffle {

/// \effects Fills `out` with bytes from the operating system's random generator.
/// \throws  `std::runtime_error` (from Crypto++) when the generator cannot be read.
void os_random(std::span<std::byte> out);

}  // namespace memshuffle
