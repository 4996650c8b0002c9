#pragma once
// A packed pool for many small secrets: blocks of 8 B to 1 KiB in power-of-two size
// classes share runs of pages from one of the secret backends (secret_backend.hpp),
// with guard pages around each run rather than around each block, so a thousand open
// secrets cost a few pages of RLIMIT_MEMLOCK instead of a thousand. Larger blocks get
// pages of their own. Every block is wiped when it is freed; a run that empties is
// given back (one empty run per size class is kept for reuse). Thread safe, and
// fork aware: in a child of fork() the parent's blocks are gone (secret memory) or zero
// (locked pages), freeing them is a no-op, and new blocks come from fresh runs.
#include <memshuffle/secret_backend.hpp>

#include <cstddef>
#include <memory>
#include <memory_resource>

namespace memshuffle {

/// Where a secret_pool_resource gets its pages and how it sizes its runs.
struct secret_pool_options {
  secret_backend backend = secret_backend::automatic;   ///< asked for; report() says what was got
  /// fail by default: a secret that might be swapped is a failure the caller must see.
  on_lock_refused lock_refused = on_lock_refused::fail;
  /// Pages per run of one size class (guard pages excluded); 0: chosen when a run is
  /// mapped, 1/16 of RLIMIT_MEMLOCK clamped to 1..16 pages, since secret memory is
  /// charged to that limit like mlock and a 64 KiB limit must hold several classes.
  std::size_t run_pages = 0;
};

/// The figures of a secret_pool_resource, from stats().
struct secret_pool_stats {
  std::size_t blocks = 0;              ///< pooled blocks live now
  std::size_t large_allocations = 0;   ///< blocks on pages of their own, live now
  std::size_t runs = 0;                ///< runs mapped now (empty ones kept for reuse included)
  std::size_t bytes_mapped = 0;        ///< now, guard pages included
  std::size_t bytes_locked = 0;        ///< now (secret memory counts as locked)
  std::size_t total_allocations = 0;   ///< ever
  std::size_t bad_deallocations = 0;   ///< ignored: double free, foreign pointer, wrong size
  std::size_t forked_blocks = 0;       ///< blocks from before a fork freed in the child
  std::size_t spare_large_bytes = 0;   ///< emptied large spans kept for reuse (in bytes_mapped)
};

/// A packed, thread-safe, fork-aware pool of small secret blocks in power-of-two size
/// classes over secret memory or locked pages (see secret_backend.hpp).
class secret_pool_resource : public std::pmr::memory_resource {
 public:
  static constexpr std::size_t smallest_class = 8;     ///< bytes of the smallest size class
  static constexpr std::size_t largest_class = 1024;   ///< larger blocks get pages of their own

  /// \effects as secret_pool_resource(secret_pool_options{}).
  secret_pool_resource();
  /// \effects resolves options.backend (automatic: secret memory if the kernel has it,
  /// else locked pages, reported as degraded); maps nothing yet.
  /// \throws std::invalid_argument if options.run_pages is above 1024;
  /// secret_memory_refused if secret_memory is asked for and the kernel lacks it.
  explicit secret_pool_resource(secret_pool_options options);
  /// \effects wipes and unmaps every page; in a child of fork() leaves the parent's
  /// pages untouched (they are gone or zero there).
  ~secret_pool_resource() override;
  secret_pool_resource(const secret_pool_resource&) = delete;
  secret_pool_resource& operator=(const secret_pool_resource&) = delete;

  /// \returns the options, with backend as asked (report().backend says what was got).
  const secret_pool_options& options() const noexcept;
  /// \returns what the pool obtained from the kernel so far.
  secret_memory_report report() const;
  /// \returns counts of blocks, runs and bytes at this moment.
  secret_pool_stats stats() const;

 protected:
  /// \returns a zeroed block of at least \p bytes (1 if 0) aligned to \p alignment.
  /// \throws bad_alignment (a std::bad_alloc) for an alignment that is not a power of
  /// two or is larger than the page size; secret_memory_refused when a lock is refused
  /// under on_lock_refused::fail; std::bad_alloc when mmap fails. Nothing changes when
  /// it throws.
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  /// \effects wipes the block and makes it free. A pointer the pool did not hand out,
  /// a block already free, or a size or alignment of another size class is ignored and
  /// counted in stats().bad_deallocations (debug_checks builds abort with a message);
  /// the pool is never corrupted. A block from before a fork, freed in the child, is
  /// left untouched.
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override;
  /// \returns true only for this very object.
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override;

 private:
  struct state;
  friend secret_pool_resource& default_secret_pool() noexcept;
  /// pthread_atfork handlers of the process-wide pool: hold its lock across fork().
  static void lock_for_fork() noexcept;
  static void unlock_after_fork() noexcept;

  secret_pool_options options_;
  std::unique_ptr<state> state_;
};

/// \returns the process-wide pool (automatic backend, on_lock_refused::fail), where the
/// library keeps its keys and, by default, the shuffler's plaintext windows. Never
/// destroyed, so objects with static storage may free into it at exit. Thread safe;
/// safe to fork while another thread is inside it.
secret_pool_resource& default_secret_pool() noexcept;

}  // namespace memshuffle
