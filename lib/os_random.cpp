#include <memshuffle/os_random.hpp>

#include <crypto++/osrng.h>

namespace memshuffle {

void os_random(std::span<std::byte> out) {
  CryptoPP::OS_GenerateRandomBlock(false, reinterpret_cast<CryptoPP::byte*>(out.data()), out.size());
}

}  // namespace memshuffle
