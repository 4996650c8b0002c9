#include <memshuffle/secure_wipe.hpp>

#include <cstring>

namespace memshuffle {

// memset and a barrier, as glibc's explicit_bzero does: the barrier makes the zeros
// look read, so the store is never dropped as dead. Crypto++'s SecureWipeBuffer
// ("rep stosb") costs some 30 cycles to start, and a rent+return wipes a dozen small
// buffers (window, counters, keystream blocks).
void secure_wipe(void* p, std::size_t n) noexcept {
  if (p == nullptr) return;
  std::memset(p, 0, n);
  asm volatile("" : : "r"(p) : "memory");
}

}  // namespace memshuffle
