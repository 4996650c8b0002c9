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

// One entry of a full shuffle: where it is, where it goes (set by begin_shuffle), and
// its table slot (which the heap never reads).
struct move {
  std::byte* from;
  std::byte* to;
  std::size_t bytes;
  std::uint32_t slot;
  std::uint32_t align_log2;
};

// The entries of one source arena: moves [first, last), placed in the order that
// order [first, last) gives (a permutation of the same range of indices).
// whole: when it does not fit in the room left in the arena being filled, it starts the
// next arena rather than being split across two.
struct window {
  std::uint32_t arena;  // its arena_number
  std::uint32_t first, last;
  std::size_t bytes;    // of all its moves
  bool whole;
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

  // A full shuffle, rolling (docs/design.md, "Heap"): the entries leave their arenas
  // window by window, and an arena emptied this way is a destination for the windows
  // after it, so the upstream holds the heap plus a few arenas at the peak.
  //
  // Arenas are numbered 0 .. arenas() - 1 for the shuffle (the number of the arena
  // holding p, which must lie in one); the numbers hold until end_shuffle().
  // index_arenas() makes arena_number() cost a lookup instead of a search until the
  // arenas change (it can throw std::bad_alloc, and changes nothing else).
  void index_arenas();
  std::uint32_t arena_number(const std::byte* p) const noexcept;
  std::size_t entries_in(std::uint32_t arena) const noexcept;
  std::uint64_t serial_at(std::uint32_t arena) const noexcept;
  // Sets every move's destination, windows in order, into the arenas that hold
  // nothing to move, the arenas emptied by earlier windows, and fresh arenas only when
  // none of those is free yet. Arenas holding an entry at stay are never reused. Opens
  // the fresh arenas now: on std::bad_alloc the heap is exactly as before. Once it
  // returns, every window must be moved, in order, and the shuffle ended.
  void begin_shuffle(std::span<move> moves, std::span<const std::uint32_t> order,
                     std::span<const window> windows, std::span<std::byte* const> stay);
  // Copies a window's entries to their destinations and wipes what they left (the
  // whole arena at once when the window empties it, for reuse). Any order of the
  // window's moves does: the one that walks the table in order is cheapest.
  void move_window(std::span<const move> moves, std::uint32_t arena) noexcept;
  // A freed entry's bytes, dropped during the shuffle.
  void drop(std::byte* p, std::size_t bytes) noexcept;
  // Gives back every arena left empty; the last destination is the arena being filled.
  void end_shuffle() noexcept;

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

  // A destination of the shuffle under way: what its placements will have filled.
  struct destination {
    arena* a;
    std::uintptr_t top;
    std::size_t entries;
    bool placed;  // an arena of its own, its one entry placed for real already
  };
  enum : std::uint8_t { keeps_entry = 1, has_window = 2, reused = 4 };

  arena& open_arena(std::size_t capacity);
  void* try_place(arena& a, const request& r);
  arena* arena_of(const void* p) const noexcept;
  void release(arena& a) noexcept;
  void plan(std::span<move> moves, std::span<const std::uint32_t> order, std::span<const window> windows);
  bool fits(const destination& d, const move& m) const noexcept;
  void next_destination(std::size_t alignment);
  void place_alone(move& m);
  void empty(std::uint32_t number) noexcept;

  std::pmr::memory_resource* upstream_;
  std::size_t arena_size_;
  std::vector<std::unique_ptr<arena>> arenas_;
  std::vector<chunk_ref> chunks_;  // sorted by begin, for arena_of()
  arena* current_ = nullptr;       // the arena being filled
  std::uint64_t next_serial_ = 0;
  std::size_t reserved_ = 0;
  std::uint64_t released_ = 0;
  // arena_number()'s index: the chunks' address range cut into granules no larger than
  // the smallest chunk, so a granule holds the end of one chunk and the start of the
  // next at most. Stale once a chunk comes or goes; none when the chunks are spread
  // too thinly (arena_of() then).
  struct granule {
    std::uintptr_t boundary;      // where `above` starts (0: the whole granule)
    std::uint32_t below, above;   // arena numbers
  };
  std::vector<granule> granules_;
  std::uintptr_t granule_base_ = 0;
  unsigned granule_shift_ = 0;
  bool granules_stale_ = true;

  // The shuffle under way.
  std::vector<std::uint8_t> role_;           // by arena number
  bool keeps_any_ = false;                   // an arena keeps an entry that stays
  std::vector<std::uint32_t> free_arenas_;   // emptied, by number, in the order they empty
  std::size_t next_free_ = 0;
  std::vector<destination> destinations_;    // in the order they are filled
  std::size_t filling_ = 0;                  // the destination being filled
};

}  // namespace memshuffle::detail
