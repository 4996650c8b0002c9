#pragma once
// The check that ends most resource tests: everything handed upstream was given back,
// each block exactly as it was allocated.
#include <doctest/doctest.h>

#include "test/support/recording_resource.hpp"

namespace memshuffle::testing {

inline void check_upstream_clean(const recording_resource& upstream) {
  CHECK(upstream.mismatches() == 0);
  CHECK(upstream.outstanding() == 0);
}

}  // namespace memshuffle::testing
