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

struct tracking_options {
  bool wipe_on_deallocate = false;          // zero freed blocks before they go upstream
  std::optional<std::byte> fill_on_allocate{};  // pattern written into every new block
  bool quarantine = false;                  // keep freed blocks until release_quarantine()
  // true: one lock guards the books and the upstream calls, so an unsynchronized
  // upstream is safe behind it. false: no locking, one thread only.
  bool thread_safe = true;
};

struct tracking_stats {
  std::size_t current_allocations = 0, current_bytes = 0, peak_bytes = 0,
              total_allocations = 0, total_bytes = 0, bad_deallocations = 0;
  std::size_t peak_allocations = 0;
  std::size_t total_deallocations = 0;   // good ones only
  std::size_t quarantined_allocations = 0, quarantined_bytes = 0;
};

// One live allocation; `sequence` numbers allocations from 1 in the order made.
struct allocation_record {
  void* pointer = nullptr;
  std::size_t bytes = 0;
  std::size_t alignment = 0;
  std::uint64_t sequence = 0;
};

enum class bad_deallocation_kind {
  unknown_pointer,   // never handed out by this resource (or freed long ago)
  double_free,       // handed out and already given back
  wrong_size,        // live, but deallocated with another size
  wrong_alignment,   // live, but deallocated with another alignment
};

const char* to_string(bad_deallocation_kind) noexcept;

struct bad_deallocation_record {
  bad_deallocation_kind kind{};
  const void* pointer = nullptr;
  std::size_t bytes = 0;        // as passed to deallocate
  std::size_t alignment = 0;    // as passed to deallocate
  allocation_record block;      // the live block it hit (wrong size/alignment only)
};

class tracking_resource : public std::pmr::memory_resource {
 public:
  tracking_resource() : tracking_resource(tracking_options{}) {}
  explicit tracking_resource(std::pmr::memory_resource* upstream)
      : tracking_resource(tracking_options{}, upstream) {}
  explicit tracking_resource(tracking_options options,
                             std::pmr::memory_resource* upstream = std::pmr::get_default_resource());
  tracking_resource(const tracking_resource&) = delete;
  tracking_resource& operator=(const tracking_resource&) = delete;
  ~tracking_resource() override;

  std::pmr::memory_resource* upstream_resource() const noexcept { return upstream_; }
  const tracking_options& options() const noexcept { return options_; }

  tracking_stats stats() const;
  bool has_leaks() const;                                  // any live allocation
  bool has_bad_deallocations() const;
  std::vector<allocation_record> live_allocations() const;  // in sequence order
  // The first `max_bad_records` bad deallocations (all are counted in stats()).
  std::vector<bad_deallocation_record> bad_deallocations() const;
  static constexpr std::size_t max_bad_records = 1024;

  // Readable: one line per leak, one per bad deallocation, then the totals.
  void report(std::ostream&) const;
  std::string report() const;

  // Gives the quarantined blocks back to the upstream.
  void release_quarantine();
  // Gives every live block back to the upstream and forgets it. Only for a caller who
  // knows nothing uses those blocks any more (a test harness after reporting a leak).
  void release_leaks();

 protected:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override;
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override;

 private:
  struct state;   // the books, in lib/tracking_resource.cpp
  tracking_options options_;
  std::pmr::memory_resource* upstream_;
  std::unique_ptr<state> state_;
};

}  // namespace memshuffle
