#pragma once
// What the secret-memory tests share: the backends this machine can test, and a check
// that memory reads as zeros.
#include <memshuffle/secret_backend.hpp>

#include "lib/secret_pages.hpp"

#include <algorithm>
#include <cstddef>
#include <vector>

namespace memshuffle::testing {

inline const bool have_secret_memory = detail::secret_memory_supported();

// The backends this machine can test, each asked for explicitly.
inline std::vector<secret_backend> backends() {
  if (have_secret_memory) return {secret_backend::locked_pages, secret_backend::secret_memory};
  return {secret_backend::locked_pages};
}

inline bool all_zero(const void* p, std::size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  return std::all_of(b, b + n, [](unsigned char c) { return c == 0; });
}

}  // namespace memshuffle::testing
