#pragma once
// An upstream whose blocks are all aligned to 4096 whatever was asked, so that offsets
// inside blocks from two such upstreams are comparable (side-by-side tests of two
// resources).
#include <algorithm>
#include <cstddef>
#include <memory_resource>

namespace memshuffle::testing {

struct page_aligned_resource : std::pmr::memory_resource {
  static constexpr std::size_t page = 4096;
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    return std::pmr::new_delete_resource()->allocate(bytes, std::max(alignment, page));
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    std::pmr::new_delete_resource()->deallocate(p, bytes, std::max(alignment, page));
  }
  bool do_is_equal(const std::pmr::memory_resource& o) const noexcept override { return this == &o; }
};

}  // namespace memshuffle::testing
