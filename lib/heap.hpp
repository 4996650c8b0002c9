#pragma once
// The heap: the arenas that hold the entries' bytes. Each arena is an arena_resource
// with exactly one chunk from the user's upstream (a full arena refuses to grow, and
// the next one is opened instead), so an arena is given back as soon as no entry is
// left in it. Everything an entry leaves is wiped, and poisoned under the address
// sanitizer; a chunk is wiped once more before it goes back upstream.
// Not synchronized: the shuffler calls it under its lock.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <memory_resource>
#include <span>
#include <vector>

#include <memshuffle/arena_resource.hpp>

#include "poison.hpp"

namespace memshuffle::detail {

struct request {
  std::size_t bytes;
  std::size_t alignment;  // a power of two
};

struct region {
  std::byte* p;
  std::size_t bytes;
};

class heap {
 public:
  heap(std::pmr::memory_resource* upstream, std::size_t arena_size);
  ~heap();  // every arena wiped and given back
  heap(const heap&) = delete;
  heap& operator=(const heap&) = delete;

  // Places the requests in order, into the arena being filled and new ones as needed;
  // fresh: begin a new arena first (a shuffle's destination). All or nothing: on
  // std::bad_alloc the heap is exactly as before.
  void place_all(std::span<const request> in, std::span<std::byte*> out, bool fresh);
  std::byte* place(std::size_t bytes, std::size_t alignment);

  // Every arena opened from now on has a serial at least this.
  std::uint64_t next_serial() const noexcept { return next_serial_; }
  // The serial of the arena holding p (p must be in one).
  std::uint64_t serial_of(const std::byte* p) const noexcept;

  // An entry left p..p+bytes: wipe and poison it, and give its arena back when no
  // entry is left there (the arena being filled is rewound instead).
  void vacate(std::byte* p, std::size_t bytes) noexcept;

  // After a full shuffle: the arenas older than serial now hold only the entries at
  // stay. Those arenas keep counting them and get the regions in left wiped; every
  // other older arena is given back whole (and wiped).
  void retire_older(std::uint64_t serial, std::span<std::byte* const> stay,
                    std::span<const region> left) noexcept;

  // Gives back the arenas older than serial that hold no entry.
  void release_empty_older(std::uint64_t serial) noexcept;

  std::size_t reserved_bytes() const noexcept { return reserved_; }
  std::size_t arenas() const noexcept { return arenas_.size(); }
  std::uint64_t arenas_released() const noexcept { return released_; }
  std::size_t arena_size() const noexcept { return arena_size_; }

 private:
  class arena;
  struct chunk_ref {
    std::uintptr_t begin, end;
    arena* owner;
  };

  arena& open_arena(std::size_t capacity);
  void* try_place(arena& a, const request& r);
  arena* arena_of(const void* p) const noexcept;
  void release(arena& a) noexcept;

  std::pmr::memory_resource* upstream_;
  std::size_t arena_size_;
  std::vector<std::unique_ptr<arena>> arenas_;
  std::vector<chunk_ref> chunks_;  // sorted by begin, for arena_of()
  arena* current_ = nullptr;       // the arena being filled
  std::uint64_t next_serial_ = 0;
  std::size_t reserved_ = 0;
  std::uint64_t released_ = 0;
};

}  // namespace memshuffle::detail
