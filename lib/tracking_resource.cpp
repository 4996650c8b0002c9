// tracking_resource: the books are sharded. Each thread records its allocations in its
// own shard (a table and a lock of its own, on cache lines of their own), so threads
// sharing a resource do not wait for each other; what must be exact across threads
// (the sequence, the current use and its peaks) is kept in one small struct under a
// lock of its own, held for a few additions (one atomic exchange; counters as atomics
// took three or more read-modify-writes per call and were slower, alone and shared).
#include <memshuffle/error.hpp>
#include <memshuffle/secure_wipe.hpp>
#include <memshuffle/tracking_resource.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <map>
#include <new>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "call_stack.hpp"
#include "live_table.hpp"
#include "poison.hpp"
#include "spin_lock.hpp"

namespace memshuffle {

namespace {

using detail::lock_if;
using detail::spin_lock;

struct freed_block {
  void* p;
  std::size_t bytes, alignment;
};

// Each thread's shard, in every resource: threads take the next index in turn. Initial
// exec and constant-initialized: a plain load from the thread pointer, where a dynamic
// thread_local in a shared library costs a call to __tls_get_addr per use.
std::atomic<std::size_t> next_shard{0};
[[gnu::tls_model("initial-exec")]] thread_local std::size_t shard_plus_one = 0;

std::size_t this_thread_shard() noexcept {
  if (shard_plus_one == 0) [[unlikely]]
    shard_plus_one = next_shard.fetch_add(1, std::memory_order_relaxed) + 1;
  return shard_plus_one - 1;
}

bool known_thread_safe(std::pmr::memory_resource* r) noexcept {
  return r == std::pmr::new_delete_resource() ||
         dynamic_cast<std::pmr::synchronized_pool_resource*>(r) != nullptr;
}

}  // namespace

struct tracking_resource::state {
  // One shard's books; the allocations it holds were made by the threads mapped to it.
  struct alignas(64) shard {
    spin_lock lock;
    detail::live_table live;
    std::size_t total_bytes = 0, total_deallocations = 0;
    // The most recently freed pointers, only to tell a double free from a stray pointer.
    std::array<const void*, 256> recently_freed{};
    std::size_t recently_freed_next = 0;
    std::unordered_map<const void*, detail::call_stack> stacks;  // with capture_stacks
  };
  static constexpr std::size_t shard_count = 8;

  // Exact across threads: the sequence (= total allocations), the current use, the peaks.
  // Read by every call, written almost never: a cache line of their own.
  alignas(64) std::atomic<long> fail_countdown{-1};  // -1: never
  bool locking = true, lock_upstream = false;
  // Updated together by every call: one line, so two threads pass one line back and forth.
  struct alignas(64) global_counts {
    spin_lock lock;
    std::size_t sequence = 0;  // = total allocations
    std::size_t current_bytes = 0, current_allocations = 0;
    std::size_t peak_bytes = 0, peak_allocations = 0;
  } counts;
  alignas(64) std::atomic<std::size_t> injected{0};
  spin_lock upstream_lock;
  // Cold: bad deallocations and quarantine.
  spin_lock cold_lock;
  std::size_t bad_count = 0;
  std::vector<bad_deallocation_record> bad;
  std::vector<freed_block> quarantine;
  std::size_t quarantined_bytes = 0;
  std::array<shard, shard_count> shards;

  shard& mine() noexcept { return locking ? shards[this_thread_shard() % shard_count] : shards[0]; }
  lock_if lock(shard& s) noexcept { return lock_if(s.lock, locking); }

  // Locks every shard in order, for a consistent view.
  struct all_locked {
    state& st;
    explicit all_locked(state& s) noexcept : st(s) {
      if (st.locking)
        for (auto& sh : st.shards) sh.lock.lock();
    }
    all_locked(const all_locked&) = delete;
    all_locked& operator=(const all_locked&) = delete;
    ~all_locked() {
      if (st.locking)
        for (auto& sh : st.shards) sh.lock.unlock();
    }
  };

  // Out of line: the call stack is large, and zeroing it would cost every allocation.
  // A stack that cannot be stored is lost; the allocation is still tracked.
  [[gnu::noinline]] static void keep_stack(shard& s, const void* p) noexcept {
    try {
      s.stacks.emplace(p, detail::capture_call_stack());
    } catch (const std::bad_alloc&) {
    }
  }

  [[gnu::cold, gnu::noinline]] void maybe_fail() {
    if (fail_countdown.fetch_sub(1, std::memory_order_relaxed) != 0) return;
    fail_countdown.store(-1, std::memory_order_relaxed);
    injected.fetch_add(1, std::memory_order_relaxed);
    throw std::bad_alloc();
  }

  bool was_freed(const void* p) noexcept {
    for (auto& sh : shards) {
      auto l = lock(sh);
      if (std::find(sh.recently_freed.begin(), sh.recently_freed.end(), p) != sh.recently_freed.end())
        return true;
    }
    return false;
  }

  // Out of line: keeps the common path of do_deallocate short. Called with no lock held.
  [[gnu::cold, gnu::noinline]] void record_bad(const void* p, std::size_t bytes,
                                               std::size_t alignment,
                                               std::optional<allocation_record> block) noexcept {
    bad_deallocation_kind kind = bad_deallocation_kind::unknown_pointer;
    if (!block) {
      if (was_freed(p)) kind = bad_deallocation_kind::double_free;
    } else {
      kind = block->bytes != bytes ? bad_deallocation_kind::wrong_size
                                   : bad_deallocation_kind::wrong_alignment;
    }
    lock_if l(cold_lock, locking);
    ++bad_count;
    if (bad.size() >= max_bad_records) return;
    try {
      bad.push_back({kind, p, bytes, alignment, block.value_or(allocation_record{})});
    } catch (const std::bad_alloc&) {
      // Still counted; only the detail is lost.
    }
  }

  // Quarantines a freed block; false when there is no room to remember it (then the
  // caller gives it back rather than lose it).
  [[gnu::noinline]] bool hold(void* p, std::size_t upstream_bytes, std::size_t alignment) noexcept {
    lock_if l(cold_lock, locking);
    try {
      quarantine.push_back({p, upstream_bytes, alignment});
    } catch (const std::bad_alloc&) {
      return false;
    }
    quarantined_bytes += upstream_bytes;
    detail::poison(p, upstream_bytes);
    return true;
  }

  // Finds the live record of p in shard s (into `found`) and erases it when it
  // matches bytes and alignment.
  enum class taken { none, mismatch, erased };
  [[gnu::always_inline]] taken take_from(shard& s, void* p, std::size_t bytes,
                                         std::size_t alignment, allocation_record& found) noexcept {
    auto l = lock(s);
    allocation_record* r = s.live.find(p);
    if (r == nullptr) return taken::none;
    // Compared in place: a copy first stalled the loads on the copy's stores.
    if (r->bytes != bytes || r->alignment != alignment) [[unlikely]] {
      found = *r;
      return taken::mismatch;
    }
    s.live.erase(r);
    if (!s.stacks.empty()) [[unlikely]]
      s.stacks.erase(p);
    ++s.total_deallocations;
    s.recently_freed[s.recently_freed_next++ % s.recently_freed.size()] = p;
    return taken::erased;
  }
  [[gnu::noinline]] taken take_elsewhere(shard& first, void* p, std::size_t bytes,
                                         std::size_t alignment, allocation_record& found) noexcept;
};

// A block freed by a thread of another shard, or a bad deallocation: every other shard.
tracking_resource::state::taken tracking_resource::state::take_elsewhere(
    shard& first, void* p, std::size_t bytes, std::size_t alignment,
    allocation_record& found) noexcept {
  for (auto& s : shards) {
    if (&s == &first) continue;
    if (const taken t = take_from(s, p, bytes, alignment, found); t != taken::none) return t;
  }
  return taken::none;
}

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
  state_->locking = options_.thread_safe;
  state_->lock_upstream =
      options_.thread_safe && !options_.upstream_thread_safe.value_or(known_thread_safe(upstream_));
}

tracking_resource::~tracking_resource() { release_quarantine(); }

void* tracking_resource::do_allocate(std::size_t bytes, std::size_t alignment) {
  // Not std::has_single_bit: without -mpopcnt that is a call into libgcc.
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) [[unlikely]]
    throw bad_alignment();
  auto& st = *state_;
  if (st.fail_countdown.load(std::memory_order_relaxed) >= 0) [[unlikely]]
    st.maybe_fail();
  auto& s = st.mine();
  auto lock = st.lock(s);
  if (!s.live.has_room()) s.live.grow();  // may throw; nothing observable has changed yet
  // A zero-byte request still gets a byte upstream, so its pointer is unique as a key.
  void* p;
  {
    lock_if upstream_lock(st.upstream_lock, st.lock_upstream);
    p = upstream_->allocate(bytes == 0 ? 1 : bytes, alignment);
  }
  std::size_t sequence;
  {
    auto& c = st.counts;
    lock_if counts_lock(c.lock, st.locking);
    sequence = ++c.sequence;
    c.current_bytes += bytes;
    ++c.current_allocations;
    c.peak_bytes = std::max(c.peak_bytes, c.current_bytes);
    c.peak_allocations = std::max(c.peak_allocations, c.current_allocations);
  }
  s.live.insert({p, bytes, alignment, sequence});
  if (options_.capture_stacks) [[unlikely]]
    state::keep_stack(s, p);
  s.total_bytes += bytes;
  if (options_.fill_on_allocate) [[unlikely]]
    std::memset(p, std::to_integer<int>(*options_.fill_on_allocate), bytes);
  return p;
}

void tracking_resource::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) {
  auto& st = *state_;
  allocation_record found;
  auto& first = st.mine();
  auto t = st.take_from(first, p, bytes, alignment, found);
  if (t == state::taken::none) [[unlikely]]
    t = st.take_elsewhere(first, p, bytes, alignment, found);
  if (t != state::taken::erased) [[unlikely]] {
    st.record_bad(p, bytes, alignment,
                  t == state::taken::mismatch ? std::optional(found) : std::nullopt);
    return;
  }
  {
    lock_if counts_lock(st.counts.lock, st.locking);
    st.counts.current_bytes -= bytes;
    --st.counts.current_allocations;
  }

  const std::size_t upstream_bytes = bytes == 0 ? 1 : bytes;
  if (options_.wipe_on_deallocate || options_.quarantine) [[unlikely]] {
    if (options_.wipe_on_deallocate) secure_wipe(p, bytes);
    if (options_.quarantine && st.hold(p, upstream_bytes, alignment)) return;
  }
  lock_if upstream_lock(st.upstream_lock, st.lock_upstream);
  upstream_->deallocate(p, upstream_bytes, alignment);
}

bool tracking_resource::do_is_equal(const std::pmr::memory_resource& other) const noexcept {
  return this == &other;
}

tracking_stats tracking_resource::stats() const {
  auto& st = *state_;
  tracking_stats out;
  state::all_locked all(st);
  for (auto& s : st.shards) {
    out.total_bytes += s.total_bytes;
    out.total_deallocations += s.total_deallocations;
  }
  {
    lock_if counts_lock(st.counts.lock, st.locking);
    out.total_allocations = st.counts.sequence;
    out.current_bytes = st.counts.current_bytes;
    out.current_allocations = st.counts.current_allocations;
    out.peak_bytes = st.counts.peak_bytes;
    out.peak_allocations = st.counts.peak_allocations;
  }
  out.injected_failures = st.injected.load();
  lock_if cold(st.cold_lock, st.locking);
  out.bad_deallocations = st.bad_count;
  out.quarantined_allocations = st.quarantine.size();
  out.quarantined_bytes = st.quarantined_bytes;
  return out;
}

bool tracking_resource::has_leaks() const {
  lock_if counts_lock(state_->counts.lock, state_->locking);
  return state_->counts.current_allocations != 0;
}

bool tracking_resource::has_bad_deallocations() const {
  lock_if cold(state_->cold_lock, state_->locking);
  return state_->bad_count != 0;
}

std::vector<allocation_record> tracking_resource::live_allocations() const {
  std::vector<allocation_record> out;
  {
    state::all_locked all(*state_);
    for (auto& s : state_->shards)
      s.live.for_each([&](const allocation_record& r) { out.push_back(r); });
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.sequence < b.sequence; });
  return out;
}

std::vector<bad_deallocation_record> tracking_resource::bad_deallocations() const {
  lock_if cold(state_->cold_lock, state_->locking);
  return state_->bad;
}

std::vector<leak_site> tracking_resource::leak_sites() const {
  std::vector<std::pair<allocation_record, detail::call_stack>> leaks;
  {
    state::all_locked all(*state_);
    for (auto& s : state_->shards)
      s.live.for_each([&](const allocation_record& r) {
        if (auto it = s.stacks.find(r.pointer); it != s.stacks.end()) leaks.emplace_back(r, it->second);
      });
  }
  // Symbolized outside the locks: it reads debug information from disk.
  std::map<std::tuple<std::string, std::size_t, std::string>, leak_site> sites;
  for (auto& [r, stack] : leaks) {
    auto f = detail::first_user_frame(stack);
    auto& site = sites[{f.file, f.line, f.function}];
    if (site.leaks == 0 || r.sequence < site.first_sequence) site.first_sequence = r.sequence;
    site.file = f.file;
    site.line = f.line;
    site.function = f.function;
    ++site.leaks;
    site.bytes += r.bytes;
  }
  std::vector<leak_site> out;
  for (auto& [key, site] : sites) out.push_back(site);
  std::sort(out.begin(), out.end(), [](const leak_site& a, const leak_site& b) {
    return a.leaks != b.leaks ? a.leaks > b.leaks : a.first_sequence < b.first_sequence;
  });
  return out;
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
  for (const auto& site : leak_sites())
    os << "leaks from " << (site.file.empty() ? "an unknown place" : site.file) << ':'
       << site.line << " in " << (site.function.empty() ? "?" : site.function) << ": "
       << site.leaks << " allocations, " << site.bytes << " bytes (first #"
       << site.first_sequence << ")\n";
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
    lock_if cold(state_->cold_lock, state_->locking);
    blocks.swap(state_->quarantine);
    state_->quarantined_bytes = 0;
  }
  lock_if upstream_lock(state_->upstream_lock, state_->lock_upstream);
  for (auto& b : blocks) {
    detail::unpoison(b.p, b.bytes);
    upstream_->deallocate(b.p, b.bytes, b.alignment);
  }
}

void tracking_resource::release_leaks() {
  std::vector<allocation_record> blocks;
  {
    state::all_locked all(*state_);
    for (auto& s : state_->shards) {
      s.live.for_each([&](const allocation_record& r) { blocks.push_back(r); });
      s.live.clear();
      s.stacks.clear();
    }
    lock_if counts_lock(state_->counts.lock, state_->locking);
    state_->counts.current_allocations = 0;
    state_->counts.current_bytes = 0;
  }
  lock_if upstream_lock(state_->upstream_lock, state_->lock_upstream);
  for (auto& r : blocks) upstream_->deallocate(r.pointer, r.bytes == 0 ? 1 : r.bytes, r.alignment);
}

void tracking_resource::fail_after(std::size_t n) noexcept {
  state_->fail_countdown.store(static_cast<long>(n), std::memory_order_relaxed);
}

void tracking_resource::fail_never() noexcept {
  state_->fail_countdown.store(-1, std::memory_order_relaxed);
}

}  // namespace memshuffle
