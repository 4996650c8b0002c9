#pragma once
// tracking_resource: an adaptor that sits between its users and an upstream resource
// and keeps books: every live allocation, current and peak usage, totals, and every
// bad deallocation (a pointer it never gave, a second free, a wrong size or
// alignment). Bad deallocations are recorded and never reach the upstream, so a
// buggy caller cannot corrupt the upstream's state.
//
// Lifetime: the destructor gives quarantined blocks back to the upstream, but NOT
// the leaked (still live) ones: a leak is the caller's bug, it stays visible to
// LeakSanitizer and to whoever owns the upstream. Call `release_leaks()` to give
// them back explicitly (a test harness does after reporting them).
#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <memory_resource>
#include <optional>
#include <string>
#include <vector>

namespace memshuffle {

/// What a tracking_resource does besides keeping books, fixed at construction.
struct tracking_options {
  bool wipe_on_deallocate = false;          ///< zero freed blocks before they go upstream
  std::optional<std::byte> fill_on_allocate{};  ///< pattern written into every new block
  bool quarantine = false;                  ///< keep freed blocks until release_quarantine()
  /// true: the books are sharded, each shard with its own lock (a thread uses its own
  /// shard), and the counters, the peaks and the sequence are kept exact across threads.
  /// false: no locking, one thread only.
  bool thread_safe = true;
  /// Whether the upstream may be called from several threads at once. Absent: true for
  /// std::pmr::new_delete_resource() and a std::pmr::synchronized_pool_resource, false
  /// otherwise. When false (and thread_safe), upstream calls are serialized by one lock,
  /// so an unsynchronized upstream (an arena, an unsynchronized pool) is safe behind it.
  std::optional<bool> upstream_thread_safe{};
  /// Record the stack of every allocation (raw return addresses, symbolized only when a
  /// report is made), so leaks are reported by call site. Costs a stack walk per
  /// allocation: see docs/performance.md.
  bool capture_stacks = false;
};

/// The counters of a tracking_resource, from stats().
struct tracking_stats {
  std::size_t current_allocations = 0;  ///< live now
  std::size_t current_bytes = 0;        ///< bytes live now (as requested)
  std::size_t peak_bytes = 0;           ///< highest current_bytes since construction
  std::size_t total_allocations = 0;    ///< allocations since construction
  std::size_t total_bytes = 0;          ///< bytes allocated since construction
  std::size_t bad_deallocations = 0;    ///< bad deallocations since construction
  std::size_t peak_allocations = 0;     ///< highest current_allocations since construction
  std::size_t total_deallocations = 0;  ///< good ones only
  std::size_t quarantined_allocations = 0;  ///< freed blocks held in quarantine now
  std::size_t quarantined_bytes = 0;        ///< their bytes as held upstream (1 for 0)
  std::size_t injected_failures = 0;    ///< allocations refused by fail_after()
};

/// One live allocation; `sequence` numbers allocations from 1 in the order made.
struct allocation_record {
  void* pointer = nullptr;     ///< what allocate returned
  std::size_t bytes = 0;       ///< as passed to allocate
  std::size_t alignment = 0;   ///< as passed to allocate
  std::uint64_t sequence = 0;  ///< 1 for the first allocation, then 2, ...
};

/// What was wrong with a bad deallocation.
enum class bad_deallocation_kind {
  unknown_pointer,   ///< never handed out by this resource (or freed long ago)
  double_free,       ///< handed out and already given back
  wrong_size,        ///< live, but deallocated with another size
  wrong_alignment,   ///< live, but deallocated with another alignment
};

/// \returns A short description of `kind`, e.g. "double free".
const char* to_string(bad_deallocation_kind kind) noexcept;

/// One bad deallocation, recorded instead of reaching the upstream.
struct bad_deallocation_record {
  bad_deallocation_kind kind{};   ///< what was wrong
  const void* pointer = nullptr;  ///< as passed to deallocate
  std::size_t bytes = 0;        ///< as passed to deallocate
  std::size_t alignment = 0;    ///< as passed to deallocate
  allocation_record block;      ///< the live block it hit (wrong size/alignment only)
};

/// Where leaked blocks were allocated: the first frame of their stacks outside
/// memshuffle and the standard library.
struct leak_site {
  std::string file;      ///< empty when the frame has no debug information
  std::size_t line = 0;  ///< 0 when unknown
  std::string function;  ///< empty when unknown
  std::size_t leaks = 0;  ///< live blocks allocated here
  std::size_t bytes = 0;  ///< their bytes
  std::uint64_t first_sequence = 0;  ///< the oldest leak from here
};

/// An adaptor over an upstream resource that keeps books on every allocation: live
/// blocks, usage, totals and bad deallocations (recorded, never passed upstream).
class tracking_resource : public std::pmr::memory_resource {
 public:
  /// \effects As tracking_resource(tracking_options{}, std::pmr::get_default_resource()).
  tracking_resource() : tracking_resource(tracking_options{}) {}
  /// \effects As tracking_resource(tracking_options{}, upstream).
  explicit tracking_resource(std::pmr::memory_resource* upstream)
      : tracking_resource(tracking_options{}, upstream) {}
  /// \effects Empty books over `upstream`.
  /// \throws std::invalid_argument for a null `upstream`; std::bad_alloc.
  explicit tracking_resource(tracking_options options,
                             std::pmr::memory_resource* upstream = std::pmr::get_default_resource());
  tracking_resource(const tracking_resource&) = delete;
  tracking_resource& operator=(const tracking_resource&) = delete;
  /// \effects Gives the quarantined blocks back; leaked blocks stay where they are.
  ~tracking_resource() override;

  /// \returns The upstream given at construction.
  std::pmr::memory_resource* upstream_resource() const noexcept { return upstream_; }
  /// \returns The options given at construction.
  const tracking_options& options() const noexcept { return options_; }

  /// \returns The counters, consistent with each other (taken under every shard's lock).
  tracking_stats stats() const;
  /// \returns Whether any allocation is live.
  bool has_leaks() const;
  /// \returns Whether any deallocation was bad.
  bool has_bad_deallocations() const;
  /// \returns The live allocations, in sequence order.
  std::vector<allocation_record> live_allocations() const;
  /// \returns The first `max_bad_records` bad deallocations (all are counted in stats()).
  std::vector<bad_deallocation_record> bad_deallocations() const;
  static constexpr std::size_t max_bad_records = 1024;  ///< bad deallocations kept as records
  /// \returns The live allocations grouped by call site, most leaks first; empty
  /// without options().capture_stacks. Symbolizes the stacks (slow: for reports).
  std::vector<leak_site> leak_sites() const;

  /// \effects Writes one line per leak, the leaks by call site (with capture_stacks),
  /// one line per bad deallocation, then the totals.
  void report(std::ostream&) const;
  /// \returns What report(std::ostream&) writes.
  std::string report() const;

  /// \effects Gives the quarantined blocks back to the upstream.
  void release_quarantine();
  /// \effects Gives every live block back to the upstream and forgets it. Only for a
  /// caller who knows nothing uses those blocks any more (a test harness after
  /// reporting a leak).
  void release_leaks();

  /// \effects The allocation `n` allocations from now (0: the next one) throws
  /// std::bad_alloc before anything is done, once; later ones succeed again. For
  /// exception tests (memshuffle/exception_test.hpp).
  void fail_after(std::size_t n) noexcept;
  /// \effects Cancels fail_after().
  void fail_never() noexcept;

 protected:
  /// \throws std::bad_alloc from the upstream or from fail_after(); bad_alignment for
  /// an alignment that is not a power of two. Nothing changes when it throws.
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  /// \effects A good deallocation goes upstream (or to quarantine); a bad one is
  /// recorded and goes nowhere.
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override;
  /// \returns Whether `other` is this very resource.
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override;

 private:
  struct state;   // the books, in lib/tracking_resource.cpp
  tracking_options options_;
  std::pmr::memory_resource* upstream_;
  std::unique_ptr<state> state_;
};

}  // namespace memshuffle
