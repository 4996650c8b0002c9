// Memory for the library's large metadata (a shuffler's handle table, a full shuffle's
// plan). Random access over a table of millions of slots misses the TLB on nearly every
// visit with 4 KiB pages; a block of a huge page or more is therefore mapped on its own,
// aligned to the huge page size, and advised to use transparent huge pages. Smaller
// blocks come from new and delete. Where the kernel refuses the advice (no transparent
// huge pages) or never follows it, the blocks stay on ordinary pages: `advice_taken()`
// says which, and the shuffler reports it in its statistics.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory_resource>

namespace memshuffle::detail {

class huge_page_resource final : public std::pmr::memory_resource {
 public:
  // The process's one instance (stateless but for counters).
  static huge_page_resource& instance() noexcept;

  // The size of a transparent huge page (2 MiB on x86-64), read once from the kernel.
  static std::size_t page_size() noexcept;
  // Whether blocks of page_size() or more are advised to use huge pages and the kernel
  // may follow: false before the first such block, and where the kernel refused the
  // advice or runs with transparent huge pages disabled.
  static bool advice_taken() noexcept;
  // Whether a block is mapped on its own (else it comes from new and delete).
  static bool mapped_alone(std::size_t bytes, std::size_t alignment) noexcept {
    return bytes >= page_size() && alignment <= page_size();
  }
  // Whether a block of this many bytes (default alignment) lies on pages advised to be huge.
  static bool on_huge_pages(std::size_t block_bytes) noexcept {
    return mapped_alone(block_bytes, alignof(std::max_align_t)) && advice_taken();
  }
  // Faults in every page of [p, p + bytes) without changing a byte: a huge page's first
  // touch clears all of it at once (milliseconds in a virtual machine), a cost a caller
  // can pay here, outside its lock, rather than in the middle of bounded work.
  static void fault_in(void* p, std::size_t bytes) noexcept;
  // Bytes in blocks mapped on their own now (advised to use huge pages if advice_taken()).
  std::size_t mapped_bytes() const noexcept { return mapped_.load(std::memory_order_relaxed); }

 private:
  huge_page_resource() = default;
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override;
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

  std::atomic<std::size_t> mapped_{0};
};

}  // namespace memshuffle::detail
