#include "heap.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <new>

#include <memshuffle/secure_wipe.hpp>

namespace memshuffle::detail {

namespace {
// The arena_resource keeps a small header at the end of its chunk; this bounds it from
// above. If it were ever larger, the arena's refusal still catches the overflow.
constexpr std::size_t chunk_header_allowance = 64;
}  // namespace

// One arena: its arena_resource draws exactly one chunk through this adaptor, which
// refuses any further chunk (the heap then opens another arena), indexes the chunk so
// an entry's arena can be found from its address, and wipes it before giving it back.
class heap::arena final : public std::pmr::memory_resource {
 public:
  arena(heap& owner, std::size_t capacity, std::uint64_t serial)
      : owner_(owner),
        serial(serial),
        pos(owner.arenas_.size()),
        capacity(capacity),
        res(arena_options{.initial_size = capacity, .growth_factor = 1, .max_chunk_size = capacity},
            this) {}
  ~arena() override { res.release(); }

  heap& owner_;
  std::uint64_t serial;
  std::size_t pos;           // index in owner.arenas_
  std::size_t capacity;      // usable bytes asked for: arena_size, or more for an arena of its own
  std::size_t entries = 0;   // entries whose bytes lie here
  bool refused = false;      // the last allocation failed because the arena is full
  bool has_chunk = false;
  // Where the next placement would start, and a bound on the chunk's usable end, so a
  // placement that cannot fit goes to the next arena without the cost of a refusal.
  std::uintptr_t base = 0, top = 0, limit = 0;
  arena_resource res;

 protected:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    if (has_chunk) {
      refused = true;
      throw std::bad_alloc();
    }
    auto& chunks = owner_.chunks_;
    if (chunks.size() == chunks.capacity()) chunks.reserve(chunks.size() * 2 + 8);
    void* p = owner_.upstream_->allocate(bytes, alignment);
    const auto b = reinterpret_cast<std::uintptr_t>(p);
    const chunk_ref ref{b, b + bytes, this};
    chunks.insert(std::upper_bound(chunks.begin(), chunks.end(), ref,
                                   [](const chunk_ref& x, const chunk_ref& y) { return x.begin < y.begin; }),
                  ref);
    owner_.granules_stale_ = true;
    has_chunk = true;
    base = top = b;
    limit = b + bytes - std::min<std::size_t>(bytes, chunk_header_allowance);
    owner_.reserved_ += bytes;
    return p;
  }

  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    unpoison(p, bytes);
    secure_wipe(p, bytes);
    auto& chunks = owner_.chunks_;
    const auto b = reinterpret_cast<std::uintptr_t>(p);
    chunks.erase(std::lower_bound(chunks.begin(), chunks.end(), b,
                                  [](const chunk_ref& c, std::uintptr_t x) { return c.begin < x; }));
    owner_.granules_stale_ = true;
    has_chunk = false;
    owner_.reserved_ -= bytes;
    owner_.upstream_->deallocate(p, bytes, alignment);
  }

  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override {
    return this == &other;
  }
};

heap::heap(std::pmr::memory_resource* upstream, std::size_t arena_size)
    : upstream_(upstream), arena_size_(arena_size) {}

heap::~heap() {
  current_ = nullptr;
  arenas_.clear();  // each arena gives its chunk back, wiped
}

heap::arena& heap::open_arena(std::size_t capacity) {
  if (arenas_.size() == arenas_.capacity()) arenas_.reserve(arenas_.size() * 2 + 8);
  arenas_.push_back(std::make_unique<arena>(*this, capacity, next_serial_));
  ++next_serial_;
  return *arenas_.back();
}

void* heap::try_place(arena& a, const request& r) {
  if (a.has_chunk) {
    const std::uintptr_t at = (a.top + r.alignment - 1) & ~(r.alignment - 1);
    if (at < a.top || at > a.limit || a.limit - at < r.bytes) return nullptr;  // full
  }
  a.refused = false;
  void* p = nullptr;
  try {
    p = a.res.allocate(r.bytes, r.alignment);
  } catch (const std::bad_alloc&) {
    if (a.refused) return nullptr;  // full; the arena is as before
    throw;                          // the upstream failed
  }
  a.top = reinterpret_cast<std::uintptr_t>(p) + r.bytes;
  return p;
}

void heap::place_all(std::span<const request> in, std::span<std::byte*> out, bool fresh) {
  arena* const before = current_;
  const std::size_t arenas_before = arenas_.size();
  const arena_marker mark = before != nullptr ? before->res.mark() : arena_marker{};
  const std::uintptr_t top_before = before != nullptr ? before->top : 0;
  std::size_t placed_before = 0;  // placed in the arena that was being filled
  if (fresh) current_ = nullptr;
  try {
    for (std::size_t i = 0; i < in.size(); ++i) {
      const request& r = in[i];
      void* p = nullptr;
      if (r.bytes > arena_size_) {
        // Larger than an arena: an arena of its own, which nothing else fills.
        arena& own = open_arena(r.bytes);
        p = try_place(own, r);
        if (p == nullptr) throw std::bad_alloc();
        ++own.entries;
      } else {
        if (current_ != nullptr) p = try_place(*current_, r);
        if (p == nullptr) {
          current_ = &open_arena(arena_size_);
          p = try_place(*current_, r);
          if (p == nullptr) throw std::bad_alloc();
        }
        ++current_->entries;
        if (current_ == before) ++placed_before;
      }
      unpoison(p, r.bytes);
      out[i] = static_cast<std::byte*>(p);
    }
  } catch (...) {
    while (arenas_.size() > arenas_before) {
      if (current_ == arenas_.back().get()) current_ = nullptr;
      arenas_.pop_back();
    }
    if (before != nullptr) {
      before->res.rewind(mark);
      before->top = top_before;
      before->entries -= placed_before;
    }
    current_ = before;
    throw;
  }
  // An arena no longer filled and left empty goes back now.
  if (before != nullptr && before != current_ && before->entries == 0) release(*before);
}

std::byte* heap::place(std::size_t bytes, std::size_t alignment) {
  const request r{bytes, alignment};
  std::byte* p = nullptr;
  place_all({&r, 1}, {&p, 1}, false);
  return p;
}

heap::arena* heap::arena_of(const void* p) const noexcept {
  const auto at = reinterpret_cast<std::uintptr_t>(p);
  auto it = std::upper_bound(chunks_.begin(), chunks_.end(), at,
                             [](std::uintptr_t x, const chunk_ref& c) { return x < c.begin; });
  if (it == chunks_.begin()) return nullptr;
  --it;
  return at < it->end ? it->owner : nullptr;
}

std::uint64_t heap::serial_of(const std::byte* p) const noexcept {
  const arena* a = arena_of(p);
  return a != nullptr ? a->serial : next_serial_;
}

void heap::release(arena& a) noexcept {
  if (&a == current_) current_ = nullptr;
  const std::size_t pos = a.pos;
  if (pos + 1 != arenas_.size()) {
    std::swap(arenas_[pos], arenas_.back());
    arenas_[pos]->pos = pos;
  }
  arenas_.pop_back();  // destroys a: its chunk is wiped and given back
  ++released_;
}

void heap::vacate(std::byte* p, std::size_t bytes) noexcept {
  secure_wipe(p, bytes);
  poison(p, bytes);
  arena* a = arena_of(p);
  if (a == nullptr || --a->entries != 0) return;
  if (a == current_) {
    // Empty but being filled: start it over (placement unpoisons what it hands out).
    a->res.reset();
    a->top = a->base;
  } else {
    release(*a);
  }
}

void heap::release_empty_older(std::uint64_t serial) noexcept {
  for (std::size_t i = arenas_.size(); i-- > 0;) {
    arena& a = *arenas_[i];
    if (a.serial < serial && a.entries == 0 && &a != current_) release(a);
  }
}

std::uint32_t heap::arena_number(const std::byte* p) const noexcept {
  if (granules_stale_) return static_cast<std::uint32_t>(arena_of(p)->pos);
  const auto at = reinterpret_cast<std::uintptr_t>(p);
  const granule& g = granules_[(at - granule_base_) >> granule_shift_];
  return at >= g.boundary ? g.above : g.below;
}

void heap::index_arenas() {
  granules_.clear();
  granules_stale_ = true;
  if (chunks_.empty()) return;
  std::uintptr_t smallest = chunks_.front().end - chunks_.front().begin;
  for (const chunk_ref& c : chunks_) smallest = std::min(smallest, c.end - c.begin);
  granule_shift_ = static_cast<unsigned>(std::bit_width(smallest) - 1);
  granule_base_ = chunks_.front().begin;
  const std::size_t count = ((chunks_.back().end - 1 - granule_base_) >> granule_shift_) + 1;
  if (count > 4 * chunks_.size() + 64) return;  // spread thinly: searching costs less memory
  granules_.resize(count);
  for (const chunk_ref& c : chunks_) {
    const auto number = static_cast<std::uint32_t>(c.owner->pos);
    const std::size_t first = (c.begin - granule_base_) >> granule_shift_;
    const std::size_t last = (c.end - 1 - granule_base_) >> granule_shift_;
    for (std::size_t g = first; g <= last; ++g) {
      const std::uintptr_t start = granule_base_ + (std::uintptr_t{g} << granule_shift_);
      if (g == first && c.begin > start) {
        granules_[g].boundary = c.begin;  // the chunk before, if any, set `below`
        granules_[g].above = number;
      } else {
        granules_[g] = {0, number, number};
      }
    }
  }
  granules_stale_ = false;
}

std::size_t heap::entries_in(std::uint32_t number) const noexcept { return arenas_[number]->entries; }
std::uint64_t heap::serial_at(std::uint32_t number) const noexcept { return arenas_[number]->serial; }

void heap::begin_shuffle(std::span<move> moves, std::span<const std::uint32_t> order,
                         std::span<const window> windows, std::span<std::byte* const> stay) {
  const std::size_t count = arenas_.size();
  // Every arena could end up a destination, plus a few fresh ones: reserved up front.
  role_.assign(count, 0);
  free_arenas_.clear();
  free_arenas_.reserve(count);
  destinations_.clear();
  destinations_.reserve(count + 8);
  next_free_ = 0;
  for (std::byte* p : stay) role_[arena_number(p)] |= keeps_entry;
  keeps_any_ = !stay.empty();
  for (const window& w : windows) role_[w.arena] |= has_window;
  for (std::uint32_t i = 0; i < count; ++i)
    if (role_[i] == 0 && arenas_[i]->capacity == arena_size_) free_arenas_.push_back(i);
  try {
    plan(moves, order, windows);
  } catch (...) {
    while (arenas_.size() > count) arenas_.pop_back();  // the fresh arenas, never used
    throw;
  }
  // Nothing can fail from here on. The arenas with nothing to move are emptied now.
  for (std::uint32_t i = 0; i < count; ++i)
    if ((role_[i] & (keeps_entry | has_window)) == 0) empty(i);
}

// Simulates the bump placement of every move, windows in order, with the arenas'
// real addresses (fresh arenas are opened here, so alignment padding is exact too).
void heap::plan(std::span<move> moves, std::span<const std::uint32_t> order,
                std::span<const window> windows) {
  filling_ = destinations_.size();  // none yet
  for (const window& w : windows) {
    // The window is read in its placement order, at random: ask for all of it first.
    for (std::uint32_t k = w.first; k < w.last; k += 2) __builtin_prefetch(&moves[k]);
    if (w.whole && filling_ != destinations_.size() &&
        destinations_[filling_].a->limit - destinations_[filling_].top < w.bytes)
      filling_ = destinations_.size();  // the next arena, not the room left here
    for (std::uint32_t k = w.first; k < w.last; ++k) {
      move& m = moves[order[k]];
      if (m.bytes > arena_size_) {
        place_alone(m);
        continue;
      }
      if (filling_ == destinations_.size() || !fits(destinations_[filling_], m)) {
        next_destination(std::size_t{1} << m.align_log2);
        if (!fits(destinations_[filling_], m)) {
          place_alone(m);  // too large for an empty arena once aligned
          continue;
        }
      }
      destination& d = destinations_[filling_];
      const std::uintptr_t at = (d.top + (std::uintptr_t{1} << m.align_log2) - 1) &
                                ~((std::uintptr_t{1} << m.align_log2) - 1);
      m.to = reinterpret_cast<std::byte*>(at);
      d.top = at + m.bytes;
      ++d.entries;
    }
    const arena& source = *arenas_[w.arena];
    if (!(role_[w.arena] & keeps_entry) && source.capacity == arena_size_) free_arenas_.push_back(w.arena);
  }
}

bool heap::fits(const destination& d, const move& m) const noexcept {
  const std::uintptr_t align = std::uintptr_t{1} << m.align_log2;
  const std::uintptr_t at = (d.top + align - 1) & ~(align - 1);
  return at >= d.top && at <= d.a->limit && d.a->limit - at >= m.bytes;
}

// The next destination: the arena emptied first and not used yet, or a fresh one
// (its chunk taken now, aligned for the entry about to go there).
void heap::next_destination(std::size_t alignment) {
  if (next_free_ < free_arenas_.size()) {
    role_[free_arenas_[next_free_]] |= reused;
    arena& a = *arenas_[free_arenas_[next_free_++]];
    destinations_.push_back({&a, a.base, 0, false});
  } else {
    arena& a = open_arena(arena_size_);
    (void)a.res.allocate(1, alignment);
    a.res.reset();
    destinations_.push_back({&a, a.base, 0, false});
  }
  filling_ = destinations_.size() - 1;
}

// An entry larger than an arena gets a fresh arena of its own, placed for real (no
// other entry goes there).
void heap::place_alone(move& m) {
  const bool none_filling = filling_ == destinations_.size();
  arena& own = open_arena(m.bytes);
  void* p = try_place(own, {m.bytes, std::size_t{1} << m.align_log2});
  if (p == nullptr) throw std::bad_alloc();
  m.to = static_cast<std::byte*>(p);
  destinations_.push_back({&own, own.top, 1, true});
  if (none_filling) filling_ = destinations_.size();
}

// An arena whose entries have all left. One the plan reuses is wiped whole, poisoned
// and rewound, a destination now; any other goes back at the end, wiped then.
void heap::empty(std::uint32_t number) noexcept {
  arena& a = *arenas_[number];
  a.entries = 0;
  if (!(role_[number] & reused)) return;
  const std::size_t used = a.top - a.base;
  secure_wipe(reinterpret_cast<std::byte*>(a.base), used);
  poison(reinterpret_cast<std::byte*>(a.base), used);
  a.res.reset();
  a.top = a.base;
}

void heap::move_window(std::span<const move> moves, std::uint32_t number) noexcept {
  arena& source = *arenas_[number];
  // The sources are read in no particular order: ask for the whole arena, in order.
  for (std::uintptr_t at = source.base; at < source.top; at += 64) __builtin_prefetch(reinterpret_cast<void*>(at));
  for (const move& m : moves) {
    unpoison(m.to, m.bytes);
    std::memcpy(m.to, m.from, m.bytes);
  }
  if (role_[number] & keeps_entry) {
    for (const move& m : moves) {
      secure_wipe(m.from, m.bytes);
      poison(m.from, m.bytes);
    }
    source.entries -= moves.size();
  } else {
    empty(number);
  }
}

void heap::drop(std::byte* p, std::size_t bytes) noexcept {
  if (!keeps_any_) return;  // every arena with a freed entry was emptied whole
  const std::uint32_t number = arena_number(p);
  if (!(role_[number] & keeps_entry)) return;  // its arena was emptied whole
  secure_wipe(p, bytes);
  poison(p, bytes);
  --arenas_[number]->entries;
}

void heap::end_shuffle() noexcept {
  current_ = nullptr;
  for (const destination& d : destinations_) {
    arena& a = *d.a;
    if (d.entries == 0) continue;  // left empty: given back below
    if (!d.placed) {
      (void)a.res.allocate(d.top - a.base, 1);  // one bump for all its placements (cannot fail: planned to fit)
      a.top = d.top;
      current_ = &a;
    }
    a.entries = d.entries;
    a.serial = next_serial_++;  // destinations count as opened now, in the order filled
  }
  for (std::size_t i = arenas_.size(); i-- > 0;)
    if (arenas_[i]->entries == 0) release(*arenas_[i]);
  role_.clear();
}

}  // namespace memshuffle::detail
