#pragma once
// Equality of two arena_stats, for tests that check an operation changed nothing.
#include <memshuffle/arena_resource.hpp>

namespace memshuffle::testing {

inline bool same(const arena_stats& a, const arena_stats& b) {
  return a.bytes_used == b.bytes_used && a.bytes_reserved == b.bytes_reserved &&
         a.chunks == b.chunks && a.allocations == b.allocations &&
         a.peak_bytes_used == b.peak_bytes_used && a.upstream_allocations == b.upstream_allocations &&
         a.retention_limit == b.retention_limit;
}

}  // namespace memshuffle::testing
