#include <memshuffle/secure_wipe.hpp>

#include <crypto++/misc.h>

namespace memshuffle {

void secure_wipe(void* p, std::size_t n) noexcept {
  if (p != nullptr) CryptoPP::SecureWipeBuffer(static_cast<CryptoPP::byte*>(p), n);
}

}  // namespace memshuffle
