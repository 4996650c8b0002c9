// Fuzzes arena_resource and tracking_resource: the input is decoded into allocate,
// deallocate, mark, rewind, reset, release, trim, failing-upstream and bad-deallocation
// operations, and after every one each live block must still hold its own pattern,
// be aligned, overlap no other, and every statistic must match a model.
#include <memshuffle/arena_resource.hpp>
#include <memshuffle/error.hpp>
#include <memshuffle/tracking_resource.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <new>
#include <optional>
#include <stdexcept>
#include <vector>

#include "test/fuzz/fuzz_check.hpp"
#include "test/support/recording_resource.hpp"

namespace {

using memshuffle::fuzz::fill_pattern;
using memshuffle::fuzz::has_pattern;

struct block {
  std::byte* p;
  std::size_t bytes, alignment;
  std::uint32_t seed;
  std::uint64_t sequence;  // order of allocation, for rewinds
};

bool overlaps(const block& a, const block& b) {
  // Zero-byte blocks still own one byte: their pointers must be distinct.
  const std::size_t na = std::max<std::size_t>(a.bytes, 1), nb = std::max<std::size_t>(b.bytes, 1);
  return a.p < b.p + nb && b.p < a.p + na;
}

void check_new_block(const block& b, const std::vector<block>& live) {
  FUZZ_CHECK(b.p != nullptr);
  FUZZ_CHECK(reinterpret_cast<std::uintptr_t>(b.p) % b.alignment == 0);
  for (const auto& other : live) FUZZ_CHECK(!overlaps(b, other));
}

void check_contents(const std::vector<block>& live) {
  for (const auto& b : live) FUZZ_CHECK(has_pattern({b.p, b.bytes}, b.seed));
}

std::size_t pick_size(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange(0, 7)) {
    case 0: return 0;
    case 1: return in.ConsumeIntegralInRange<std::size_t>(4097, 70000);  // own chunk
    default: return in.ConsumeIntegralInRange<std::size_t>(1, 512);
  }
}

std::size_t pick_alignment(FuzzedDataProvider& in) {
  return std::size_t{1} << in.ConsumeIntegralInRange(0, 12);
}

// The arena and what it must hold: the blocks the caller still uses, the blocks that
// still occupy the arena (a deallocation of anything but the most recent one is a
// no-op), the markers and which of them are still valid.
struct arena_model {
  struct marker {
    memshuffle::arena_marker m;
    std::size_t occupied;      // occupancy entries when taken
    std::byte* top;            // the arena's bump position when taken (null: unknown)
    std::uint64_t sequence;    // allocations before it have a smaller sequence
    bool valid;
  };
  std::vector<block> live;
  std::vector<block> occupied;
  std::vector<marker> markers;
  std::byte* top = nullptr;
  std::size_t peak = 0;
  std::uint64_t next_sequence = 0;

  std::size_t used() const {
    std::size_t n = 0;
    for (const auto& b : occupied) n += b.bytes;
    return n;
  }
  void note_peak() { peak = std::max(peak, used()); }

  void forget_after(std::uint64_t sequence) {
    std::erase_if(live, [&](const block& b) { return b.sequence >= sequence; });
    std::erase_if(occupied, [&](const block& b) { return b.sequence >= sequence; });
  }
  void clear() {
    note_peak();
    live.clear();
    occupied.clear();
    markers.clear();  // the epoch changed: every marker is stale
    top = nullptr;
  }
};

class resource_fuzz {
 public:
  explicit resource_fuzz(FuzzedDataProvider& in)
      : in_(in),
        direct_(tracking_options(in), &upstream_),
        under_arena_(memshuffle::tracking_options{}, &upstream_) {
    switch (in_.ConsumeIntegralInRange(0, 2)) {
      case 0:
        arena_.emplace(in_.ConsumeIntegralInRange<std::size_t>(1, 4096), &under_arena_);
        break;
      case 1:
        arena_.emplace(buffer_.data(), in_.ConsumeIntegralInRange<std::size_t>(0, buffer_.size()),
                       &under_arena_);
        break;
      default:
        reuse_last_block_ = in_.ConsumeBool();
        arena_.emplace(
            memshuffle::arena_options{
                .initial_size = in_.ConsumeIntegralInRange<std::size_t>(1, 2048),
                .growth_factor = 1.0 + in_.ConsumeIntegralInRange(0, 30) / 10.0,
                .max_chunk_size = in_.ConsumeIntegralInRange<std::size_t>(2048, 16384),
                .reuse_last_block = reuse_last_block_},
            &under_arena_);
    }
  }

  void run() {
    while (in_.remaining_bytes() > 0) {
      step(in_.ConsumeIntegralInRange(0, 19));
      check();
    }
  }

  ~resource_fuzz() {
    arena_.reset();
    FUZZ_CHECK(under_arena_.stats().current_allocations == 0);
    // The direct tracker's leaks are ours (the model's): give them back properly.
    for (const auto& b : direct_live_) direct_.deallocate(b.p, b.bytes, b.alignment);
    FUZZ_CHECK(!direct_.has_leaks());
    direct_.release_quarantine();
    FUZZ_CHECK(upstream_.outstanding() == 0);
    FUZZ_CHECK(upstream_.mismatches() == 0);
  }

 private:
  static memshuffle::tracking_options tracking_options(FuzzedDataProvider& in) {
    memshuffle::tracking_options o;
    o.wipe_on_deallocate = in.ConsumeBool();
    if (in.ConsumeBool()) o.fill_on_allocate = std::byte{in.ConsumeIntegral<std::uint8_t>()};
    o.quarantine = in.ConsumeBool();
    o.thread_safe = in.ConsumeBool();
    return o;
  }

  std::uint32_t next_seed() { return ++seed_; }

  template <class V>
  std::size_t pick(const V& v) {
    return in_.ConsumeIntegralInRange<std::size_t>(0, v.size() - 1);
  }

  void step(int op) {
    auto& a = *arena_;
    auto& m = arena_model_;
    switch (op) {
      case 0: case 1: case 2: arena_allocate(); break;
      case 3:  // deallocate any live block; only the most recent one gives bytes back
        if (!m.live.empty()) {
          const std::size_t i = pick(m.live);
          const block b = m.live[i];
          m.live.erase(m.live.begin() + static_cast<std::ptrdiff_t>(i));
          a.deallocate(b.p, b.bytes, b.alignment);
          pop_if_top(b);
        }
        break;
      case 4:  // push/pop: deallocate the most recent allocation
        if (!m.live.empty() && m.live.back().sequence + 1 == m.next_sequence) {
          const block b = m.live.back();
          m.live.pop_back();
          a.deallocate(b.p, b.bytes, b.alignment);
          pop_if_top(b);
        }
        break;
      case 5:
        m.markers.push_back({a.mark(), m.occupied.size(), m.top, m.next_sequence, true});
        break;
      case 6: rewind(); break;
      case 7: a.reset(); m.clear(); break;
      case 8: a.release(); m.clear(); break;
      case 9: a.trim(); break;
      case 10: {  // the upstream fails: the arena is exactly as before
        const auto before = a.stats();
        upstream_.fail_after(0);
        const std::size_t bytes = pick_size(in_), alignment = pick_alignment(in_);
        try {
          add_arena_block(a.allocate(bytes, alignment), bytes, alignment);
        } catch (const std::bad_alloc&) {
          const auto after = a.stats();
          FUZZ_CHECK(after.bytes_used == before.bytes_used && after.chunks == before.chunks &&
                     after.bytes_reserved == before.bytes_reserved &&
                     after.allocations == before.allocations);
        }
        upstream_.fail_never();
        break;
      }
      case 11: {  // an alignment that is not a power of two
        const auto before = a.stats();
        bool threw = false;
        try {
          (void)a.allocate(8, 3 << in_.ConsumeIntegralInRange(0, 8));
        } catch (const memshuffle::bad_alignment&) {
          threw = true;
        }
        FUZZ_CHECK(threw);
        FUZZ_CHECK(a.stats().bytes_used == before.bytes_used &&
                   a.stats().allocations == before.allocations);
        break;
      }
      case 12: case 13: direct_allocate(); break;
      case 14: direct_deallocate(); break;
      case 15: bad_deallocate(); break;
      case 16: direct_.release_quarantine(); direct_model_.quarantined = {}; break;
      case 17: {  // the upstream fails under the tracker: its books are unchanged
        upstream_.fail_after(0);
        const std::size_t bytes = pick_size(in_), alignment = pick_alignment(in_);
        bool threw = false;
        try {
          direct_.deallocate(direct_.allocate(bytes, alignment), bytes, alignment);
        } catch (const std::bad_alloc&) {
          threw = true;
        }
        upstream_.fail_never();
        FUZZ_CHECK(threw);
        break;
      }
      case 18: {  // a scope rewinds what was allocated inside it
        const std::uint64_t first = m.next_sequence;
        const std::size_t occupied = m.occupied.size();
        std::byte* top = m.top;
        {
          memshuffle::arena_scope scope(a);
          for (int n = in_.ConsumeIntegralInRange(0, 4); n > 0; --n) arena_allocate();
        }
        m.note_peak();
        m.forget_after(first);
        FUZZ_CHECK(m.occupied.size() == occupied);
        m.top = top;
        break;
      }
      default: {
        const auto text = direct_.report();
        FUZZ_CHECK(!text.empty());
        break;
      }
    }
  }

  void arena_allocate() {
    const std::size_t bytes = pick_size(in_), alignment = pick_alignment(in_);
    add_arena_block(arena_->allocate(bytes, alignment), bytes, alignment);
  }

  void add_arena_block(void* p, std::size_t bytes, std::size_t alignment) {
    auto& m = arena_model_;
    const block b{static_cast<std::byte*>(p), bytes, alignment, next_seed(), m.next_sequence++};
    check_new_block(b, m.live);
    check_new_block(b, direct_live_);
    fill_pattern({b.p, b.bytes}, b.seed);
    m.live.push_back(b);
    m.occupied.push_back(b);
    m.top = b.p + std::max<std::size_t>(bytes, 1);
    m.note_peak();
  }

  // Only an arena made with reuse_last_block gives the most recent block back; by
  // default deallocate has no effect, as monotonic_buffer_resource's.
  void pop_if_top(const block& b) {
    auto& m = arena_model_;
    if (!reuse_last_block_ || m.occupied.empty() || m.occupied.back().p != b.p ||
        b.p + std::max<std::size_t>(b.bytes, 1) != m.top)
      return;
    m.note_peak();
    m.occupied.pop_back();
    m.top = b.p;
    // The arena is now before every marker taken after b: those are stale.
    for (auto& mk : m.markers)
      if (mk.sequence > b.sequence) mk.valid = false;
  }

  void rewind() {
    auto& m = arena_model_;
    if (m.markers.empty()) return;
    const std::size_t i = pick(m.markers);
    const auto mk = m.markers[i];
    const auto before = arena_->stats();
    bool threw = false;
    try {
      arena_->rewind(mk.m);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    if (!mk.valid) {  // stale: refused, and nothing changed
      FUZZ_CHECK(threw);
      FUZZ_CHECK(arena_->stats().bytes_used == before.bytes_used);
      return;
    }
    FUZZ_CHECK(!threw);
    m.note_peak();
    m.forget_after(mk.sequence);
    FUZZ_CHECK(m.occupied.size() == mk.occupied);
    m.top = mk.top;
    // Markers taken after this one are stale now.
    for (std::size_t j = i + 1; j < m.markers.size(); ++j) m.markers[j].valid = false;
  }

  void direct_allocate() {
    const std::size_t bytes = pick_size(in_), alignment = pick_alignment(in_);
    void* p = direct_.allocate(bytes, alignment);
    const block b{static_cast<std::byte*>(p), bytes, alignment, next_seed(), ++direct_sequence_};
    check_new_block(b, direct_live_);
    check_new_block(b, arena_model_.live);
    if (direct_.options().fill_on_allocate)
      for (std::size_t k = 0; k < bytes; ++k) FUZZ_CHECK(b.p[k] == *direct_.options().fill_on_allocate);
    fill_pattern({b.p, b.bytes}, b.seed);
    direct_live_.push_back(b);
    auto& d = direct_model_;
    ++d.total_allocations;
    d.total_bytes += bytes;
    d.peak_allocations = std::max(d.peak_allocations, direct_live_.size());
    d.peak_bytes = std::max(d.peak_bytes, live_bytes(direct_live_));
  }

  void direct_deallocate() {
    if (direct_live_.empty()) return;
    const std::size_t i = pick(direct_live_);
    const block b = direct_live_[i];
    direct_live_.erase(direct_live_.begin() + static_cast<std::ptrdiff_t>(i));
    direct_.deallocate(b.p, b.bytes, b.alignment);
    freed_.push_back(b.p);
    ++direct_model_.total_deallocations;
    if (direct_.options().quarantine) {
      ++direct_model_.quarantined.first;
      // What the quarantine holds from the upstream: a zero-byte block took one byte.
      direct_model_.quarantined.second += std::max<std::size_t>(b.bytes, 1);
    }
  }

  // Each kind of bad deallocation is recorded as that kind and changes nothing else.
  void bad_deallocate() {
    using kind = memshuffle::bad_deallocation_kind;
    const auto before = direct_.bad_deallocations().size();
    std::optional<kind> expected;
    switch (in_.ConsumeIntegralInRange(0, 3)) {
      case 0:
        direct_.deallocate(buffer_.data() + 8, 8, 8);
        expected = kind::unknown_pointer;
        break;
      case 1: {  // a second free (unless the upstream has handed that address out again)
        if (freed_.empty()) return;
        std::byte* p = freed_[pick(freed_)];
        if (std::any_of(direct_live_.begin(), direct_live_.end(),
                        [&](const block& b) { return b.p == p; }))
          return;
        direct_.deallocate(p, 8, 8);
        break;  // double_free, or unknown_pointer once it has left the recent list
      }
      case 2:
        if (direct_live_.empty()) return;
        {
          const block& b = direct_live_[pick(direct_live_)];
          direct_.deallocate(b.p, b.bytes + 1, b.alignment);
        }
        expected = kind::wrong_size;
        break;
      default:
        if (direct_live_.empty()) return;
        {
          const block& b = direct_live_[pick(direct_live_)];
          direct_.deallocate(b.p, b.bytes, b.alignment * 2);
        }
        expected = kind::wrong_alignment;
    }
    ++direct_model_.bad;
    const auto records = direct_.bad_deallocations();
    if (before < memshuffle::tracking_resource::max_bad_records) {
      FUZZ_CHECK(records.size() == before + 1);
      if (expected) FUZZ_CHECK(records.back().kind == *expected);
      else FUZZ_CHECK(records.back().kind == kind::double_free ||
                      records.back().kind == kind::unknown_pointer);
    }
  }

  static std::size_t live_bytes(const std::vector<block>& v) {
    std::size_t n = 0;
    for (const auto& b : v) n += b.bytes;
    return n;
  }

  void check() {
    check_contents(arena_model_.live);
    check_contents(direct_live_);

    const auto& m = arena_model_;
    const auto as = arena_->stats();
    FUZZ_CHECK(as.bytes_used == m.used());
    FUZZ_CHECK(as.allocations == m.occupied.size());
    FUZZ_CHECK(as.peak_bytes_used == std::max(m.peak, m.used()));
    const auto us = under_arena_.stats();
    FUZZ_CHECK(us.current_bytes == as.bytes_reserved);
    FUZZ_CHECK(us.current_allocations == as.chunks);
    FUZZ_CHECK(us.total_allocations == as.upstream_allocations);
    FUZZ_CHECK(us.bad_deallocations == 0);

    const auto ds = direct_.stats();
    const auto& d = direct_model_;
    FUZZ_CHECK(ds.current_allocations == direct_live_.size());
    FUZZ_CHECK(ds.current_bytes == live_bytes(direct_live_));
    FUZZ_CHECK(ds.peak_bytes == d.peak_bytes);
    FUZZ_CHECK(ds.peak_allocations == d.peak_allocations);
    FUZZ_CHECK(ds.total_allocations == d.total_allocations);
    FUZZ_CHECK(ds.total_bytes == d.total_bytes);
    FUZZ_CHECK(ds.total_deallocations == d.total_deallocations);
    FUZZ_CHECK(ds.bad_deallocations == d.bad);
    FUZZ_CHECK(ds.quarantined_allocations == d.quarantined.first);
    FUZZ_CHECK(ds.quarantined_bytes == d.quarantined.second);
    FUZZ_CHECK(direct_.has_leaks() == !direct_live_.empty());
    const auto records = direct_.live_allocations();
    FUZZ_CHECK(records.size() == direct_live_.size());
    for (std::size_t i = 0; i < records.size(); ++i) {  // both in allocation order
      FUZZ_CHECK(records[i].pointer == direct_live_[i].p);
      FUZZ_CHECK(records[i].bytes == direct_live_[i].bytes);
      FUZZ_CHECK(records[i].alignment == direct_live_[i].alignment);
    }
    // Nothing bad ever reaches the upstream.
    FUZZ_CHECK(upstream_.mismatches() == 0);
  }

  FuzzedDataProvider& in_;
  memshuffle::testing::recording_resource upstream_;
  alignas(64) std::array<std::byte, 1024> buffer_{};
  memshuffle::tracking_resource direct_;
  memshuffle::tracking_resource under_arena_;
  std::optional<memshuffle::arena_resource> arena_;
  bool reuse_last_block_ = false;
  arena_model arena_model_;
  std::vector<block> direct_live_;
  std::vector<std::byte*> freed_;
  std::uint64_t direct_sequence_ = 0;
  std::uint32_t seed_ = 0;
  struct {
    std::size_t peak_bytes = 0, peak_allocations = 0, total_allocations = 0, total_bytes = 0,
                total_deallocations = 0, bad = 0;
    std::pair<std::size_t, std::size_t> quarantined{};
  } direct_model_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  resource_fuzz(in).run();
  return 0;
}
