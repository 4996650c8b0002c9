#include "heap.hpp"
#include "heap_arena.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <new>

#include <memshuffle/secure_wipe.hpp>

namespace memshuffle::detail {

heap::heap(std::pmr::memory_resource* upstream, std::size_t arena_size)
    : upstream_(upstream), arena_size_(arena_size) {}

heap::~heap() {
  current_ = nullptr;
  arenas_.clear();  // each arena gives its chunk back, wiped
}

void heap::record_deleter::operator()(arena* a) const noexcept {
  a->~arena();
  pool->deallocate(a, sizeof(arena), alignof(arena));
}

heap::arena& heap::open_arena(std::size_t capacity) {
  if (arenas_.size() == arenas_.capacity()) arenas_.reserve(arenas_.size() * 2 + 8);
  void* record = records_.allocate(sizeof(arena), alignof(arena));
  try {
    arenas_.emplace_back(new (record) arena(*this, capacity, next_serial_), record_deleter{&records_});
  } catch (...) {
    records_.deallocate(record, sizeof(arena), alignof(arena));
    throw;
  }
  ++next_serial_;
  return *arenas_.back();
}

void* heap::try_place(arena& a, const request& r) {
  if (a.chunk_bytes != 0) {
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
  return chunks_.find(reinterpret_cast<std::uintptr_t>(p));
}

heap::where heap::locate(const std::byte* p) const noexcept {
  where w;
  w.a_ = arena_of(p);
  return w;
}

std::uint64_t heap::serial_of(where w) const noexcept { return w.a_ != nullptr ? w.a_->serial : next_serial_; }

void heap::release(arena& a, bool wiped) noexcept {
  if (holding_) return;  // the arena numbers hold; end_shuffle() gives it back
  a.wiped = wiped;
  if (&a == current_) current_ = nullptr;
  const std::size_t pos = a.pos;
  if (pos + 1 != arenas_.size()) {
    std::swap(arenas_[pos], arenas_.back());
    arenas_[pos]->pos = pos;
  }
  arenas_.pop_back();  // destroys a: its chunk is wiped and given back
  ++released_;
}

void heap::vacate(std::byte* p, std::size_t bytes, where w) noexcept {
  secure_wipe(p, bytes);
  poison(p, bytes);
  arena* a = w.a_;
  if (a == nullptr || --a->entries != 0) return;
  if (a == current_) {
    // Empty but being filled: start it over (placement unpoisons what it hands out).
    a->res.reset();
    a->top = a->base;
  } else {
    // Its last entry left: every other byte an entry held was wiped as that entry left
    // (or by the full shuffle that ended since), so a second wipe is not needed.
    release(*a, true);
  }
}

void heap::release_empty_older(std::uint64_t serial) noexcept {
  for (std::size_t i = arenas_.size(); i-- > 0;) {
    arena& a = *arenas_[i];
    if (a.serial < serial && a.entries == 0 && &a != current_) release(a);
  }
}

heap::where heap::at(std::uint32_t number) const noexcept {
  where w;
  w.a_ = arenas_[number].get();
  return w;
}

std::size_t heap::chunk_bytes(std::uint32_t number) const noexcept { return arenas_[number]->chunk_bytes; }
bool heap::filling(std::uint32_t number) const noexcept { return arenas_[number].get() == current_; }

void heap::drop(where w) noexcept {
  arena& a = *w.a_;
  a.entries = 0;
  if (&a != current_) {
    release(a);  // wiped up to its fill
    return;
  }
  unpoison(reinterpret_cast<void*>(a.base), a.top - a.base);
  secure_wipe(reinterpret_cast<void*>(a.base), a.top - a.base);
  poison(reinterpret_cast<void*>(a.base), a.top - a.base);
  a.res.reset();
  a.top = a.base;
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
  std::uintptr_t smallest = UINTPTR_MAX, lo = UINTPTR_MAX, hi = 0;
  chunks_.for_each([&](const auto& c) {
    smallest = std::min(smallest, c.end - c.begin);
    lo = std::min(lo, c.begin);
    hi = std::max(hi, c.end);
  });
  granule_shift_ = static_cast<unsigned>(std::bit_width(smallest) - 1);
  granule_base_ = lo;
  const std::size_t count = ((hi - 1 - granule_base_) >> granule_shift_) + 1;
  if (count > 4 * chunks_.live() + 64) return;  // spread thinly: searching costs less memory
  granules_.resize(count);
  chunks_.for_each([&](const auto& c) {
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
  });
  granules_stale_ = false;
}

std::size_t heap::entries_in(std::uint32_t number) const noexcept { return arenas_[number]->entries; }
std::uint64_t heap::serial_at(std::uint32_t number) const noexcept { return arenas_[number]->serial; }

}  // namespace memshuffle::detail
