#pragma once
// Memory for secrets: every allocation gets its own pages from mmap, locked in RAM so
// it is never swapped, left out of core dumps, optionally fenced by inaccessible guard
// pages, and wiped before it is unmapped. Page granular, so meant for few, small,
// long-lived blocks (keys, plaintext windows), not as a general-purpose heap.
#include <memshuffle/secret_backend.hpp>

#include <cstddef>
#include <map>
#include <memory_resource>
#include <mutex>

namespace memshuffle {

/// How a secure_page_resource protects its pages, fixed at construction.
struct secure_page_options {
  bool lock = true;         ///< mlock the pages
  /// A refused mlock: degrade (the default, kept for compatibility) counts it in
  /// stats().lock_failures and locked(); fail throws secret_memory_refused instead.
  on_lock_refused lock_refused = on_lock_refused::degrade;
  bool dont_dump = true;    ///< MADV_DONTDUMP: leave the pages out of core dumps
  bool wipe_on_fork = true; ///< MADV_WIPEONFORK: a child of fork() sees zeros
  /// One PROT_NONE page before and after each allocation. The block is placed so that
  /// its end abuts the trailing guard page (as libsodium's sodium_malloc does): one
  /// byte past the end faults when the size is a multiple of the alignment (always
  /// for alignment 1). The leading guard catches underflow past the start of the page.
  bool guard_pages = true;
};

/// The figures of a secure_page_resource, from stats().
struct secure_page_stats {
  std::size_t bytes_mapped = 0;       ///< now, guard pages included
  std::size_t bytes_locked = 0;       ///< now
  std::size_t lock_failures = 0;      ///< allocations whose pages mlock refused, ever
  std::size_t allocations = 0;        ///< live now
  std::size_t total_allocations = 0;  ///< ever
};

/// Memory for secrets, page by page: each allocation gets its own mapping, locked,
/// left out of core dumps, optionally between guard pages, and wiped before unmapping.
/// Thread safe.
class secure_page_resource : public std::pmr::memory_resource {
 public:
  /// \effects As secure_page_resource(secure_page_options{}).
  secure_page_resource() : secure_page_resource(secure_page_options{}) {}
  /// \effects A resource with `options` that holds no pages yet.
  explicit secure_page_resource(secure_page_options options);
  /// \effects Wipes and unmaps whatever is still allocated.
  ~secure_page_resource() override;
  secure_page_resource(const secure_page_resource&) = delete;
  secure_page_resource& operator=(const secure_page_resource&) = delete;

  /// \returns The options given at construction.
  const secure_page_options& options() const noexcept { return options_; }
  /// \returns The figures at this moment.
  secure_page_stats stats() const;
  /// \returns True when every live allocation is locked in RAM (and locking is on):
  /// false once mlock was refused for one of them, e.g. under a small RLIMIT_MEMLOCK.
  bool locked() const;
  /// \returns The system's page size, the granularity of every allocation.
  static std::size_t page_size() noexcept;

 protected:
  /// \returns A block of `bytes` (1 if 0) aligned to `alignment`, on pages of its own,
  /// whose end abuts the trailing guard page (see secure_page_options).
  /// \throws bad_alignment (a std::bad_alloc) for an alignment that is not a power of
  /// two or is larger than page_size(); std::bad_alloc when mmap fails or `bytes` is too
  /// large to map; secret_memory_refused (a std::bad_alloc) for a refused mlock under
  /// on_lock_refused::fail. Nothing changes when it throws.
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  /// \effects Wipes, unlocks and unmaps the pages of `p`. Pointers this resource did
  /// not hand out are ignored.
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override;
  /// \returns Whether `other` is this very resource.
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override;

 private:
  struct region {
    void* base;            // start of the mapping (the leading guard page, if any)
    std::size_t mapped;    // length of the mapping
    std::size_t usable;    // length of the readable pages
    bool locked;
  };
  static void release(const region& r) noexcept;

  secure_page_options options_;
  mutable std::mutex m_;
  std::map<void*, region> regions_;   // by the pointer handed out
  secure_page_stats stats_;
};

}  // namespace memshuffle
