#pragma once
// The heap's arena (lib/heap.cpp), shared by the heap's sources.
#include <algorithm>
#include <new>

#include <memshuffle/secure_wipe.hpp>

#include "heap.hpp"

namespace memshuffle::detail {

// The arena_resource keeps a small header at the end of its chunk; this bounds it from
// above. If it were ever larger, the arena's refusal still catches the overflow.
inline constexpr std::size_t chunk_header_allowance = 64;

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
  // Every byte an entry left here was wiped as it left: the chunk goes back as it is.
  bool wiped = false;
  std::size_t chunk_bytes = 0;  // from the upstream; 0 before the chunk comes and after it goes
  // Where the next placement would start, and a bound on the chunk's usable end, so a
  // placement that cannot fit goes to the next arena without the cost of a refusal.
  std::uintptr_t base = 0, top = 0, limit = 0;
  arena_resource res;

 protected:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    if (chunk_bytes != 0) {
      refused = true;
      throw std::bad_alloc();
    }
    owner_.chunks_.reserve_one();
    void* p = owner_.upstream_->allocate(bytes, alignment);
    const auto b = reinterpret_cast<std::uintptr_t>(p);
    owner_.chunks_.insert(b, b + bytes, this);
    owner_.granules_stale_ = true;
    chunk_bytes = bytes;
    base = top = b;
    limit = b + bytes - std::min<std::size_t>(bytes, chunk_header_allowance);
    owner_.reserved_ += bytes;
    return p;
  }

  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    unpoison(p, bytes);
    // Bytes at and above top were never handed out since the last wipe: wiping them
    // would only fault in pages the upstream may never have touched.
    if (!wiped) secure_wipe(p, top - reinterpret_cast<std::uintptr_t>(p));
    owner_.chunks_.erase(reinterpret_cast<std::uintptr_t>(p));
    owner_.granules_stale_ = true;
    chunk_bytes = 0;
    owner_.reserved_ -= bytes;
    owner_.upstream_->deallocate(p, bytes, alignment);
  }

  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override {
    return this == &other;
  }
};

}  // namespace memshuffle::detail
