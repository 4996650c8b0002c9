#pragma once
// Clearing the vector registers after a cipher call, so that no core file (which saves
// them) and no later spill onto the stack holds the last block of plaintext, keystream
// or round keys (docs/security.md, "The cipher's custody").
namespace memshuffle::detail {

/// \effects Sets every vector register the ABI lets a callee clobber to zero:
///          on x86-64 ymm0-15 (vzeroall) where AVX is usable, else xmm0-15, and
///          zmm16-31 where AVX-512 is; on aarch64 v0-v31 (the low halves of v8-v15,
///          which the caller saves, come back as the caller left them). Elsewhere it
///          does nothing.
void clear_vector_registers() noexcept;

// Clears the vector registers when it goes out of scope, on every path out of a call.
// Declared first in a function, so that its destructor runs after every other one.
struct vector_register_guard {
  vector_register_guard() = default;
  vector_register_guard(const vector_register_guard&) = delete;
  vector_register_guard& operator=(const vector_register_guard&) = delete;
  ~vector_register_guard() { clear_vector_registers(); }
};

}  // namespace memshuffle::detail
