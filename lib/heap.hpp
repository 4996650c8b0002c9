#pragma once
// The heap: the arenas that hold the entries' bytes. Each arena is an arena_resource
// with exactly one chunk from the user's upstream (a full arena refuses to grow, and
// the next one is opened instead), so an arena is given back as soon as no entry is
// left in it. Everything an entry leaves is wiped, and poisoned under the address
// sanitizer; a chunk given back with entries' bytes not wiped one by one (dropped
// whole, drained by a full shuffle, or the heap's end) is wiped up to its fill first.
// Not synchronized: the shuffler calls it under its lock.
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <memory_resource>
#include <span>
#include <utility>
#include <vector>

#include <memshuffle/arena_resource.hpp>

#include "chunk_index.hpp"
#include "layout_rng.hpp"
#include "poison.hpp"

namespace memshuffle::detail {

struct request {
  std::size_t bytes;
  std::size_t alignment;  // a power of two
};

// One entry of a full shuffle: where it is, where it goes (set by begin_shuffle), and
// its table slot (which the heap never reads). The plan replaces align_log2 by the
// padding left before `to`, which the move wipes.
struct move {
  std::byte* from;
  std::byte* to;
  std::size_t bytes;
  std::uint32_t slot;
  std::uint32_t align_log2;
};

// Whether a move's entry must stay where it is (pinned since it was listed).
struct keep_test {
  const void* context = nullptr;
  bool (*test)(const void* context, const move& m) noexcept = nullptr;
  bool operator()(const move& m) const noexcept { return test != nullptr && test(context, m); }
};

// The entries of one source arena: moves [first, last), sorted by address.
struct window {
  std::uint32_t arena;  // its arena_number
  std::uint32_t first, last;
  std::size_t bytes;    // of all its moves
};

class heap {
  class arena;  // lib/heap_arena.hpp

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
  // The arena holding an entry, found once for the calls that take it (valid until
  // that arena is given back).
  class where {
    friend class heap;
    arena* a_ = nullptr;
  };
  where locate(const std::byte* p) const noexcept;
  // Asks for w's arena record early: a walk over entries at random misses it each time.
  static void prefetch(where w) noexcept { __builtin_prefetch(w.a_); }
  // The serial of the arena holding p (p must be in one).
  std::uint64_t serial_of(where w) const noexcept;
  std::uint64_t serial_of(const std::byte* p) const noexcept { return serial_of(locate(p)); }

  // An entry left p..p+bytes: wipe and poison it, and give its arena back when no
  // entry is left there (the arena being filled is rewound instead).
  void vacate(std::byte* p, std::size_t bytes, where w) noexcept;
  void vacate(std::byte* p, std::size_t bytes) noexcept { vacate(p, bytes, locate(p)); }

  // A full shuffle, in place (docs/design.md, "Heap"): the entries leave their arenas
  // front to back, the windows interleaved, and each goes into the room some arena's
  // departed entries left at its front. So the upstream holds the heap plus an arena or
  // two at the peak, and an arena's new entries come from all over the heap.
  //
  // Arenas are numbered 0 .. arenas() - 1 for the shuffle (the number of the arena
  // holding p, which must lie in one); the numbers hold until end_shuffle().
  // index_arenas() makes arena_number() cost a lookup instead of a search until the
  // arenas change (it can throw std::bad_alloc, and changes nothing else).
  void index_arenas();
  std::uint32_t arena_number(const std::byte* p) const noexcept;
  std::size_t entries_in(std::uint32_t arena) const noexcept;
  std::uint64_t serial_at(std::uint32_t arena) const noexcept;
  // Starts the shuffle's plan. Each window's moves must be sorted by address. With
  // rng, the windows are read interleaved at random (each step takes the next entry of
  // a window drawn at random), and the arena being filled changes to one drawn at
  // random among those with room; without it, windows are read one after the other in
  // the order given, so the order is kept. The arenas needed for the live bytes (the
  // fullest) are the destinations, the others are drained and given back at the end.
  // On std::bad_alloc the heap is exactly as before; once it returns, plan_part,
  // run_moves and end_shuffle follow.
  void begin_shuffle(std::span<move> moves, std::span<const window> windows, layout_rng* rng);
  // Plans the next steps, as many as sequence holds, writing the moves' order there;
  // returns how many (0: every move is planned). Sets each move's destination, opening
  // fresh arenas only when no destination has room. A move whose entry keep says must
  // stay, or that finds no room when the upstream fails, stays where it is: its `to`
  // is null and its arena keeps it (a destination's writes pass over it later). So
  // once begun, a shuffle always completes.
  std::size_t plan_part(std::span<move> moves, std::span<const window> windows, layout_rng* rng, keep_test keep,
                        std::span<std::uint32_t> sequence);
  // begin_shuffle and a plan of every move at once into sequence, nothing kept; on
  // std::bad_alloc the heap is exactly as before.
  void begin_shuffle(std::span<move> moves, std::span<const window> windows, layout_rng* rng,
                     std::span<std::uint32_t> sequence);
  // Copies every entry to its destination, in the planned sequence (each write lands on
  // bytes whose entries have been copied out already), and wipes the padding between.
  void run_moves(std::span<const move> moves, std::span<const std::uint32_t> sequence) noexcept;
  // Wipes what no entry covers any more, gives back every arena left empty; the last
  // destination filled is the arena being filled. moves: the plan's (for the entries
  // kept in place). Ends hold().
  void end_shuffle(std::span<const move> moves) noexcept;
  void end_shuffle() noexcept { end_shuffle({}); }

  // For a shuffle whose parts run with the shuffler's lock released between them: the
  // arenas keep their numbers (none is given back) and entries placed meanwhile go to
  // arenas opened for them, which the shuffle never reads or writes (the shuffle's are
  // those open at hold()). release_hold()
  // undoes it before begin_shuffle; end_shuffle ends it.
  void hold() noexcept;
  void release_hold() noexcept;

  // Gives back the arenas older than serial that hold no entry.
  void release_empty_older(std::uint64_t serial) noexcept;

  // For a compaction, by arena number (valid, as for a shuffle, from index_arenas()
  // until an arena comes or goes; a where stays valid until its own arena goes):
  where at(std::uint32_t number) const noexcept;
  // What the arena holds from the upstream.
  std::size_t chunk_bytes(std::uint32_t number) const noexcept;
  bool filling(std::uint32_t number) const noexcept;
  // The next placement opens a new arena; the one being filled stays as it is, even
  // empty (drop it, or release_empty_older, to give it back).
  void stop_filling() noexcept { current_ = nullptr; }
  // Every entry of the arena has been copied out or freed, none vacated one by one:
  // give it back, wiped whole at once (the arena being filled is wiped and rewound).
  void drop(where w) noexcept;

  std::size_t reserved_bytes() const noexcept { return reserved_; }
  std::size_t arenas() const noexcept { return arenas_.size(); }
  std::uint64_t arenas_released() const noexcept { return released_; }
  std::size_t arena_size() const noexcept { return arena_size_; }

 private:

  // An arena during the shuffle under way, by arena number (fresh ones appended).
  struct planned {
    std::uintptr_t w, f;       // the room: [w, f) left by departed entries, not written yet
    std::uint32_t roomy = 0;   // its index in roomy_ plus one, 0 when not there
    std::uint32_t written = 0; // entries placed here
    std::uint32_t kept = 0;    // entries kept in place when their turn came, listed by
    std::uint32_t kept_first = ~std::uint32_t{0};  // ascending address from this move
    std::uint32_t kept_last = ~std::uint32_t{0};   // through align_log2
    // A destination's lowest kept entry at or above w: the room runs on above it, and
    // the writes pass over it (the bytes left below it noted in gaps_).
    std::uint32_t barrier = ~std::uint32_t{0};
    std::uint8_t role = 0;
  };
  enum : std::uint8_t {
    destination = 1, placed_alone = 2,
    room_capped = 4,  // the room ends below a kept entry for good (no memory to note a gap)
    outside = 8       // opened for allocations during the shuffle: not the shuffle's
  };

  arena& open_arena(std::size_t capacity);
  void* try_place(arena& a, const request& r);
  arena* arena_of(const void* p) const noexcept;
  void release(arena& a, bool wiped = false) noexcept;
  void choose_destinations(std::span<const window> windows);
  std::uint32_t next_window(std::span<move> moves, std::span<const window> windows, layout_rng* rng);
  std::uint32_t next_in_order(std::span<const window> windows) noexcept;
  std::uint32_t draw(std::span<move> moves, layout_rng& rng) noexcept;
  void retire(std::span<const window> windows, std::uint32_t wi) noexcept;
  void drop_roomy(std::uint32_t number) noexcept;
  bool place_move(move& m, layout_rng* rng, bool absorb);
  std::uint32_t take(std::span<move> moves, const window& w, std::uint32_t& cursor, layout_rng* rng,
                     keep_test keep, bool absorb);
  void keep_in_place(std::span<move> moves, std::uint32_t k, std::uint32_t number) noexcept;
  arena& open_planned(std::size_t capacity, std::uint8_t role);
  void settle_destination(std::span<const move> moves, std::uint32_t number) noexcept;
  void wipe_except_kept(std::span<const move> moves, std::uint32_t number, std::uintptr_t begin,
                        std::uintptr_t end) noexcept;
  std::uintptr_t spot(std::uint32_t number, const move& m) const noexcept;
  bool fits(std::uint32_t number, const move& m) const noexcept { return spot(number, m) != 0; }
  bool reserve_gap() noexcept;
  std::uint32_t pick_roomy(const move& m, layout_rng* rng) noexcept;
  void set_room(std::uint32_t number, std::uintptr_t f) noexcept;
  std::uint32_t open_destination(std::size_t alignment);
  void place_alone(move& m);

  std::pmr::memory_resource* upstream_;
  std::size_t arena_size_;
  // Arena records come from a pool of their own: beside its chunk (a new of its own), each
  // record would lie a page and a TLB entry away from the next, and walks over entries at
  // random read a record per entry. Not on huge pages: a new one's first touch, under the
  // lock as an arena opens, stopped an incremental step for milliseconds every 1,400
  // arenas, and the walks were no faster for them.
  struct record_deleter {
    std::pmr::memory_resource* pool;
    void operator()(arena* a) const noexcept;
  };
  std::pmr::unsynchronized_pool_resource records_{std::pmr::new_delete_resource()};
  std::vector<std::unique_ptr<arena, record_deleter>> arenas_;
  chunk_index<arena> chunks_;      // for arena_of()
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
  std::vector<planned> plan_;
  std::vector<std::uint32_t> roomy_;       // destinations whose room may take an entry
  std::vector<std::uint32_t> cursor_;      // by window: its next move
  std::vector<std::uint32_t> crediting_, draining_;  // windows with moves left: whose arena is a destination, or not
  std::vector<std::uint32_t> ready_at_;    // by window: its index in one of those
  std::size_t room_ = 0;                   // bytes of room over all destinations
  std::uint32_t filling_ = 0;              // the destination being filled, if any
  bool has_filling_ = false;
  const move* kept_moves_ = nullptr;       // the plan's moves, for the barriers' chains
  // The bytes a destination's writes passed over below a kept entry: wiped at the end.
  // Reserved as entries are kept (gap_slots_ of them), so a move never allocates.
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> gaps_;
  std::size_t gap_slots_ = 0;
  bool holding_ = false;                   // hold(): no arena given back
  std::size_t held_ = 0;                   // the arenas open at hold(): the shuffle's
  // The plan's progress between parts: the windows drawn ahead (at random), or the
  // window being read, the next not yet read and the next deferred one (in order).
  static constexpr std::size_t ahead = 8;
  std::array<std::uint32_t, ahead> drawn_{};
  std::size_t step_ = 0, total_ = 0;
  std::uint32_t reading_ = 0, next_window_ = 0, deferred_ = 0;
};

}  // namespace memshuffle::detail
