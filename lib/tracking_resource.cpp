// tracking_resource: the books are sharded. Each thread records its allocations in its
// own shard (a table, a lock and its current use, on cache lines of their own), so
// threads sharing a resource do not wait for each other. What must be exact across
// threads: the sequence is one atomic counter, taken once per allocation (a plain
// increment while the process has one thread); the peaks are kept exact by allowances
// (lib/shared_peak.hpp), so a shard touches the shared peaks only when it grows past
// its allowance, and a deallocation touches nothing shared.
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
#include "shared_peak.hpp"
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
    // Of the blocks in this shard's table; `allowed` changes under peaks.lock too.
    detail::shard_usage bytes, allocations;
    std::size_t total_bytes = 0, total_deallocations = 0;
    // The most recently freed pointers, only to tell a double free from a stray pointer.
    std::array<const void*, 256> recently_freed{};
    std::size_t recently_freed_next = 0;
    std::unordered_map<const void*, detail::call_stack> stacks;  // with capture_stacks
  };
  static constexpr std::size_t shard_count = 8;

  // Read by every call, written almost never: a cache line of their own.
  alignas(64) std::atomic<long> fail_countdown{-1};  // -1: never
  bool locking = true, lock_upstream = false;
  // = total allocations; incremented under the allocating shard's lock.
  alignas(64) std::atomic<std::uint64_t> sequence{0};
  // Taken before any shard lock by whoever locks more than one shard.
  struct alignas(64) peak_books {
    spin_lock lock;
    detail::shared_peak bytes, allocations;
  } peaks;
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

  std::uint64_t next_sequence() noexcept {
    // Alone, a plain increment: no other thread can see it half done.
    if (!locking || detail::process_single_threaded()) {
      const auto n = sequence.load(std::memory_order_relaxed) + 1;
      sequence.store(n, std::memory_order_relaxed);
      return n;
    }
    return sequence.fetch_add(1, std::memory_order_relaxed) + 1;
  }

  // Locks the peaks, then every shard in order, for a consistent view.
  struct all_locked {
    state& st;
    explicit all_locked(state& s) noexcept : st(s) {
      if (!st.locking) return;
      st.peaks.lock.lock();
      for (auto& sh : st.shards) sh.lock.lock();
    }
    all_locked(const all_locked&) = delete;
    all_locked& operator=(const all_locked&) = delete;
    ~all_locked() {
      if (!st.locking) return;
      for (auto& sh : st.shards) sh.lock.unlock();
      st.peaks.lock.unlock();
    }
  };

  // Counts an allocation of `bytes` in s (locked by the caller, and locked on return).
  // \throws std::bad_alloc when s's table cannot grow; then nothing has changed.
  void count(shard& s, std::size_t bytes) {
    if (!s.bytes.fits(bytes) || !s.allocations.fits(1)) [[unlikely]]
      return count_past_allowance(s, bytes);
    add(s, bytes);
  }
  static void add(shard& s, std::size_t bytes) noexcept {
    s.bytes.current += bytes;
    ++s.allocations.current;
  }
  void count_past_allowance(shard& s, std::size_t bytes);
  void count_at_peak(shard& s, std::size_t bytes) noexcept;

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
    s.bytes.current -= bytes;
    --s.allocations.current;
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

// Past its allowance: the peaks' lock comes before any shard's, so s is let go and taken
// again (its table may have filled meanwhile).
void tracking_resource::state::count_past_allowance(shard& s, std::size_t bytes) {
  if (locking) s.lock.unlock();
  lock_if peaks_lock(peaks.lock, locking);
  if (locking) s.lock.lock();
  if (!s.live.has_room()) s.live.grow();  // may throw; nothing has changed yet
  // Both asked (no short circuit): what one grants stays allotted either way.
  const bool bytes_granted = peaks.bytes.grant(s.bytes, bytes);
  const bool count_granted = peaks.allocations.grant(s.allocations, 1);
  if (bytes_granted && count_granted) return add(s, bytes);
  count_at_peak(s, bytes);
}

// The spare is short: the other shards give back what they do not use, and stay locked
// until the new block is counted, so a raised peak is the exact sum of the current uses.
void tracking_resource::state::count_at_peak(shard& s, std::size_t bytes) noexcept {
  std::array<bool, shard_count> held{};
  for (std::size_t i = 0; i < shard_count; ++i) {
    shard& o = shards[i];
    // No allowance: nothing in use, and none to take back (allowances change under peaks.lock).
    if (&o == &s || (o.bytes.allowed == 0 && o.allocations.allowed == 0)) continue;
    if (locking) o.lock.lock();
    held[i] = true;
    peaks.bytes.reclaim(o.bytes);
    peaks.allocations.reclaim(o.allocations);
  }
  if (!peaks.bytes.grant(s.bytes, bytes)) peaks.bytes.raise(s.bytes, bytes);
  if (!peaks.allocations.grant(s.allocations, 1)) peaks.allocations.raise(s.allocations, 1);
  add(s, bytes);
  for (std::size_t i = 0; i < shard_count; ++i)
    if (held[i] && locking) shards[i].lock.unlock();
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
  try {
    st.count(s, bytes);
  } catch (...) {
    lock_if upstream_lock(st.upstream_lock, st.lock_upstream);
    upstream_->deallocate(p, bytes == 0 ? 1 : bytes, alignment);
    throw;
  }
  const std::uint64_t sequence = st.next_sequence();
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
    out.current_bytes += s.bytes.current;
    out.current_allocations += s.allocations.current;
  }
  out.total_allocations = st.sequence.load(std::memory_order_relaxed);
  out.peak_bytes = st.peaks.bytes.peak();
  out.peak_allocations = st.peaks.allocations.peak();
  out.injected_failures = st.injected.load();
  lock_if cold(st.cold_lock, st.locking);
  out.bad_deallocations = st.bad_count;
  out.quarantined_allocations = st.quarantine.size();
  out.quarantined_bytes = st.quarantined_bytes;
  return out;
}

bool tracking_resource::has_leaks() const {
  state::all_locked all(*state_);
  return std::any_of(state_->shards.begin(), state_->shards.end(),
                     [](const state::shard& s) { return s.allocations.current != 0; });
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
      s.bytes.current = 0;
      s.allocations.current = 0;
    }
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
