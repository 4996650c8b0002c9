#include <memshuffle/tracking_resource.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstring>
#include <new>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <thread>
#if __has_include(<sys/single_threaded.h>)
#include <sys/single_threaded.h>
#define MEMSHUFFLE_SINGLE_THREADED_FLAG 1
#else
#define MEMSHUFFLE_SINGLE_THREADED_FLAG 0
#endif

#include "poison.hpp"

namespace memshuffle {

namespace {

// Quarantined memory is poisoned, so a use after free is reported at the faulting
// access, not just observed later.
using detail::poison;
using detail::unpoison;

// Live allocations keyed by pointer: open addressing with linear probing and
// backward-shift deletion, so the hot path never allocates (a node-based map would
// cost a malloc per tracked allocation, more than the upstream itself).
class live_table {
 public:
  allocation_record* find(const void* p) noexcept {
    if (slots_.empty()) return nullptr;
    for (std::size_t i = home(p);; i = (i + 1) & mask_) {
      if (slots_[i].pointer == p) return &slots_[i];
      if (slots_[i].pointer == nullptr) return nullptr;
    }
  }

  // At most three quarters full, so probe sequences stay short.
  bool has_room() const noexcept { return (size_ + 1) * 4 <= slots_.size() * 3; }

  // Doubles the table; the only step that can throw, and then nothing has changed.
  void grow() {
    std::vector<allocation_record> old(std::max<std::size_t>(64, slots_.size() * 2));
    old.swap(slots_);
    mask_ = slots_.size() - 1;
    shift_ = 64 - std::countr_zero(slots_.size());
    for (auto& r : old)
      if (r.pointer) place(r);
  }

  void insert(const allocation_record& r) noexcept {  // when has_room()
    place(r);
    ++size_;
  }

  void erase(allocation_record* r) noexcept {
    std::size_t hole = static_cast<std::size_t>(r - slots_.data());
    for (std::size_t i = (hole + 1) & mask_; slots_[i].pointer; i = (i + 1) & mask_) {
      // Move back any record whose probe sequence passes over the hole.
      if (((i - home(slots_[i].pointer)) & mask_) >= ((i - hole) & mask_)) {
        slots_[hole] = slots_[i];
        hole = i;
      }
    }
    slots_[hole] = allocation_record{};
    --size_;
  }

  std::size_t size() const noexcept { return size_; }

  template <class F>
  void for_each(F f) const {
    for (auto& r : slots_)
      if (r.pointer) f(r);
  }

  void clear() noexcept {
    std::fill(slots_.begin(), slots_.end(), allocation_record{});
    size_ = 0;
  }

 private:
  std::size_t home(const void* p) const noexcept {
    auto x = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(p));
    // Fibonacci hashing: the top bits of the product spread evenly spaced addresses
    // (a heap's blocks) evenly; lower bits of it cluster badly under linear probing.
    // An index that kept neighbouring blocks in neighbouring slots was 4% faster with
    // 1000 live blocks but three times slower with a million (long probe runs).
    return static_cast<std::size_t>((x * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  void place(const allocation_record& r) noexcept {
    std::size_t i = home(r.pointer);
    while (slots_[i].pointer) i = (i + 1) & mask_;
    slots_[i] = r;
  }

  std::vector<allocation_record> slots_;
  std::size_t mask_ = 0;
  int shift_ = 64;
  std::size_t size_ = 0;
};

// While the process has a single thread (glibc's __libc_single_threaded, which only
// ever goes from true to false, and only when this thread starts another), taking
// the lock needs no atomic read-modify-write: glibc's own mutex and malloc skip theirs
// the same way, and a locked instruction costs as much as half an allocation. Once
// threads exist it is one atomic exchange to lock and a plain store to unlock
// (std::mutex: two atomic read-modify-writes and two calls into libc). The critical
// sections are short (a few table operations and the upstream call), so a waiter
// spins briefly, then yields its core (on a loaded machine the holder may be
// preempted, or the upstream may be in a system call).
class spin_lock {
 public:
  void lock() noexcept {
    if (single_threaded() && !locked_.load(std::memory_order_relaxed)) {
      locked_.store(true, std::memory_order_relaxed);
      return;
    }
    if (!locked_.exchange(true, std::memory_order_acquire)) [[likely]]
      return;
    wait();
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  static bool single_threaded() noexcept {
#if MEMSHUFFLE_SINGLE_THREADED_FLAG
    return __libc_single_threaded;
#else
    return false;
#endif
  }
  [[gnu::noinline]] void wait() noexcept {
    for (int spins = 0;; ++spins) {
      if (!locked_.load(std::memory_order_relaxed) &&
          !locked_.exchange(true, std::memory_order_acquire))
        return;
      if (spins < 100) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
  std::atomic<bool> locked_{false};
};

// Locks only when the resource is thread safe.
class lock_if {
 public:
  lock_if(spin_lock& l, bool enabled) noexcept : lock_(enabled ? &l : nullptr) {
    if (lock_) lock_->lock();
  }
  lock_if(const lock_if&) = delete;
  lock_if& operator=(const lock_if&) = delete;
  ~lock_if() {
    if (lock_) lock_->unlock();
  }

 private:
  spin_lock* lock_;
};

struct freed_block {
  void* p;
  std::size_t bytes, alignment;
};

}  // namespace

struct tracking_resource::state {
  spin_lock mutex;
  live_table live;
  tracking_stats stats;
  std::uint64_t sequence = 0;
  std::vector<bad_deallocation_record> bad;
  std::vector<freed_block> quarantine;
  // The most recently freed pointers, only to tell a double free from a stray pointer.
  std::array<const void*, 1024> recently_freed{};
  std::size_t recently_freed_next = 0;

  lock_if lock(bool thread_safe) noexcept { return lock_if(mutex, thread_safe); }

  bool was_freed(const void* p) const noexcept {
    return std::find(recently_freed.begin(), recently_freed.end(), p) != recently_freed.end();
  }

  // Out of line: keeps the common path of do_deallocate short.
  [[gnu::cold, gnu::noinline]] void record_bad(const void* p, std::size_t bytes,
                                               std::size_t alignment,
                                               const allocation_record* block) noexcept {
    bad_deallocation_kind kind = bad_deallocation_kind::unknown_pointer;
    if (block == nullptr) {
      if (was_freed(p)) kind = bad_deallocation_kind::double_free;
    } else {
      kind = block->bytes != bytes ? bad_deallocation_kind::wrong_size
                                   : bad_deallocation_kind::wrong_alignment;
    }
    ++stats.bad_deallocations;
    if (bad.size() >= max_bad_records) return;
    try {
      bad.push_back({kind, p, bytes, alignment, block ? *block : allocation_record{}});
    } catch (const std::bad_alloc&) {
      // Still counted; only the detail is lost.
    }
  }

  // Quarantines a freed block; false when there is no room to remember it (then the
  // caller gives it back rather than lose it).
  [[gnu::noinline]] bool hold(void* p, std::size_t upstream_bytes, std::size_t alignment) noexcept {
    try {
      quarantine.push_back({p, upstream_bytes, alignment});
    } catch (const std::bad_alloc&) {
      return false;
    }
    ++stats.quarantined_allocations;
    stats.quarantined_bytes += upstream_bytes;
    poison(p, upstream_bytes);
    return true;
  }
};

const char* to_string(bad_deallocation_kind kind) noexcept {
  switch (kind) {
    case bad_deallocation_kind::unknown_pointer: return "pointer never allocated here";
    case bad_deallocation_kind::double_free: return "double free";
    case bad_deallocation_kind::wrong_size: return "wrong size";
    case bad_deallocation_kind::wrong_alignment: return "wrong alignment";
  }
  return "unknown";
}

tracking_resource::tracking_resource(tracking_options options, std::pmr::memory_resource* upstream)
    : options_(options), upstream_(upstream), state_(std::make_unique<state>()) {
  if (upstream_ == nullptr) throw std::invalid_argument("tracking_resource: null upstream");
}

tracking_resource::~tracking_resource() { release_quarantine(); }

// The upstream is called under the lock too: an unsynchronized upstream (an arena, an
// unsynchronized pool) stays safe behind a thread-safe tracking resource.
void* tracking_resource::do_allocate(std::size_t bytes, std::size_t alignment) {
  auto& s = *state_;
  auto lock = s.lock(options_.thread_safe);
  if (!s.live.has_room()) s.live.grow();  // may throw; nothing observable has changed yet
  // A zero-byte request still gets a byte upstream, so its pointer is unique as a key.
  void* p = upstream_->allocate(bytes == 0 ? 1 : bytes, alignment);
  s.live.insert({p, bytes, alignment, ++s.sequence});
  auto& st = s.stats;
  ++st.current_allocations;
  st.current_bytes += bytes;
  ++st.total_allocations;
  st.total_bytes += bytes;
  st.peak_bytes = std::max(st.peak_bytes, st.current_bytes);
  st.peak_allocations = std::max(st.peak_allocations, st.current_allocations);
  if (options_.fill_on_allocate) [[unlikely]]
    std::memset(p, std::to_integer<int>(*options_.fill_on_allocate), bytes);
  return p;
}

void tracking_resource::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) {
  auto& s = *state_;
  auto lock = s.lock(options_.thread_safe);
  allocation_record* r = s.live.find(p);
  if (r == nullptr || r->bytes != bytes || r->alignment != alignment) [[unlikely]] {
    s.record_bad(p, bytes, alignment, r);
    return;
  }
  s.live.erase(r);
  auto& st = s.stats;
  --st.current_allocations;
  st.current_bytes -= bytes;
  ++st.total_deallocations;
  s.recently_freed[s.recently_freed_next++ % s.recently_freed.size()] = p;

  const std::size_t upstream_bytes = bytes == 0 ? 1 : bytes;
  if (options_.wipe_on_deallocate || options_.quarantine) [[unlikely]] {
    if (options_.wipe_on_deallocate) secure_wipe(p, bytes);
    if (options_.quarantine && s.hold(p, upstream_bytes, alignment)) return;
  }
  upstream_->deallocate(p, upstream_bytes, alignment);
}

bool tracking_resource::do_is_equal(const std::pmr::memory_resource& other) const noexcept {
  return this == &other;
}

tracking_stats tracking_resource::stats() const {
  auto lock = state_->lock(options_.thread_safe);
  return state_->stats;
}

bool tracking_resource::has_leaks() const {
  auto lock = state_->lock(options_.thread_safe);
  return state_->live.size() != 0;
}

bool tracking_resource::has_bad_deallocations() const {
  auto lock = state_->lock(options_.thread_safe);
  return state_->stats.bad_deallocations != 0;
}

std::vector<allocation_record> tracking_resource::live_allocations() const {
  std::vector<allocation_record> out;
  {
    auto lock = state_->lock(options_.thread_safe);
    out.reserve(state_->live.size());
    state_->live.for_each([&](const allocation_record& r) { out.push_back(r); });
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.sequence < b.sequence; });
  return out;
}

std::vector<bad_deallocation_record> tracking_resource::bad_deallocations() const {
  auto lock = state_->lock(options_.thread_safe);
  return state_->bad;
}

void tracking_resource::report(std::ostream& os) const {
  // Long lists are cut: the first leaks in order tell where to look.
  constexpr std::size_t max_lines = 256;
  const auto leaks = live_allocations();
  const auto bad = bad_deallocations();
  const auto st = stats();
  std::size_t shown = 0;
  for (const auto& r : leaks) {
    if (shown++ == max_lines) {
      os << "... and " << leaks.size() - max_lines << " more leaks\n";
      break;
    }
    os << "leak: allocation #" << r.sequence << ", " << r.bytes << " bytes, alignment "
       << r.alignment << ", at " << r.pointer << '\n';
  }
  for (const auto& b : bad) {
    os << "bad deallocation (" << to_string(b.kind) << "): " << b.pointer << ", "
       << b.bytes << " bytes, alignment " << b.alignment;
    if (b.block.pointer)
      os << "; the block is allocation #" << b.block.sequence << ", " << b.block.bytes
         << " bytes, alignment " << b.block.alignment;
    os << '\n';
  }
  if (st.bad_deallocations > bad.size())
    os << "... and " << st.bad_deallocations - bad.size() << " more bad deallocations\n";
  os << "totals: " << st.current_allocations << " live allocations (" << st.current_bytes
     << " bytes), peak " << st.peak_bytes << " bytes and " << st.peak_allocations
     << " allocations, " << st.total_allocations << " allocations (" << st.total_bytes
     << " bytes) in all, " << st.bad_deallocations << " bad deallocations\n";
}

std::string tracking_resource::report() const {
  std::ostringstream os;
  report(os);
  return std::move(os).str();
}

void tracking_resource::release_quarantine() {
  std::vector<freed_block> blocks;
  {
    auto lock = state_->lock(options_.thread_safe);
    blocks.swap(state_->quarantine);
    state_->stats.quarantined_allocations = 0;
    state_->stats.quarantined_bytes = 0;
  }
  for (auto& b : blocks) {
    unpoison(b.p, b.bytes);
    upstream_->deallocate(b.p, b.bytes, b.alignment);
  }
}

void tracking_resource::release_leaks() {
  std::vector<allocation_record> blocks;
  {
    auto lock = state_->lock(options_.thread_safe);
    blocks.reserve(state_->live.size());
    state_->live.for_each([&](const allocation_record& r) { blocks.push_back(r); });
    state_->live.clear();
    state_->stats.current_allocations = 0;
    state_->stats.current_bytes = 0;
  }
  for (auto& r : blocks) upstream_->deallocate(r.pointer, r.bytes == 0 ? 1 : r.bytes, r.alignment);
}

}  // namespace memshuffle
