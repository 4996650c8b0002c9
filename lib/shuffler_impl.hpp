#pragma once
// The shuffler's algorithm, not synchronized: its handle table, heap and key ring, the
// policies, the statistics, and the steps of every operation. The lock, the waits and
// the fork check are the caller's (shuffler_sync.hpp), as Boost's
// synchronized_pool_resource wraps its unsynchronized pool. Cipher work on an entry runs
// in three steps: pin_* under the lock marks the entry opening or sealing (which keeps
// every other thread, and every shuffle, away from its bytes), *_outside does the
// cipher work without the lock, and commit_* records the outcome under the lock again.
// Members are defined in shuffler_impl.cpp (entries, policies, rent and return),
// shuffle_passes.cpp (the full shuffle, the incremental shuffle, the move on return),
// compaction.cpp (the policies' compaction) and key_rotation.cpp.
#include <memshuffle/shuffler.hpp>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory_resource>
#include <span>
#include <vector>

#include "handle_table.hpp"
#include "heap.hpp"
#include "huge_page_resource.hpp"
#include "index_permutation.hpp"
#include "key_ring.hpp"
#include "layout_rng.hpp"

namespace memshuffle {

struct shuffler::impl {
  using entry = detail::entry;
  using entry_state = detail::entry_state;
  using key_slot = detail::key_slot;
  using layout_rng = detail::layout_rng;

  // o holds no key or salt: those come as pointers, straight into the key ring.
  impl(const shuffler_options& o, const key_type* key, const salt_type* salt, std::pmr::memory_resource* up);
  ~impl();
  impl(const impl&) = delete;
  impl& operator=(const impl&) = delete;

  // The tag of the handle table, given back to the registry when the shuffler ends.
  struct tag_owner {
    detail::tag_grant grant = detail::acquire_tag();
    std::uint32_t used = grant.first_generation;
    tag_owner() = default;
    tag_owner(const tag_owner&) = delete;
    tag_owner& operator=(const tag_owner&) = delete;
    ~tag_owner() { detail::release_tag(grant.tag, used); }
  };

  shuffler_options opt;  // without key and salt, which only the key ring holds
  std::pmr::memory_resource* upstream;
  // Where a lease shows plaintext: null when it decrypts in place in the arena.
  std::pmr::memory_resource* window_resource;
  // The window of the last lease (up to a page), wiped, kept for the next one of that
  // size: a rent+return then never calls the pool, whose lock and books cost as much as
  // the cipher on small entries. Only with the library's secret memory, which no caller
  // watches.
  struct window_block {
    std::byte* p = nullptr;
    std::size_t bytes = 0, alignment = 0;
  } spare;
  const bool keep_spare;
  const bool encrypting;
  const std::size_t tag_bytes;
  bool on_return;

  tag_owner tag;
  detail::handle_table table;
  detail::heap heap;
  detail::key_ring keys;
  layout_rng rng;

  // The incremental shuffle under way: it visits the slots that existed when it began,
  // in the order of a permutation drawn then (computed index by index, no list).
  struct pass_state {
    bool active = false;
    detail::index_permutation order;
    std::uint64_t cursor = 0;  // how many slots of order have been visited
    std::uint64_t serial = 0;  // arenas older than this are being emptied
  } pass;

  // Reused between shuffles so a steady heap does not allocate for them.
  std::vector<std::uint32_t> moves, doomed, run_end;
  std::vector<std::size_t> run_bytes;
  // A compaction's (lib/compaction.cpp), by arena number.
  struct compaction_state {
    struct arena_tally {
      std::size_t bytes = 0;           // of its entries at rest, as stored
      std::uint32_t at_rest = 0, freed = 0;
      std::uint32_t source = 0;        // its place among the sources plus one; 0: not one
      bool pinned = false;             // holds an entry not at rest
      bool whole = false;              // a source whose every entry moves or is freed: dropped whole
    };
    struct slot_at {
      std::uint32_t slot, arena;
    };
    struct move_item {
      std::byte* src;
      std::size_t bytes;
      std::uint32_t slot, arena;
    };
    std::vector<arena_tally> arenas;
    std::vector<move_item> at_rest;
    std::vector<slot_at> freed;
    std::vector<std::uint32_t> sources;  // arena numbers, in the order they are emptied
    std::vector<std::pair<float, std::uint32_t>> by_share;  // bytes at rest / held, arena
    // By source, where its entries start in moving and its freed slots in dropping (one
    // more at the end).
    std::vector<std::uint32_t> first_move, first_freed;
    std::vector<move_item> moving;
    std::vector<std::uint32_t> dropping;
    std::vector<detail::heap::where> where;
  } compacting;
  // A full shuffle's moves, by source arena, in slot order (visited at random: on huge pages).
  std::pmr::vector<detail::move> plan{&detail::huge_page_resource::instance()};
  std::vector<detail::move> sort_scratch;  // sort_by_address's
  std::vector<detail::window> windows;
  std::vector<std::byte*> dest;
  std::vector<detail::request> reqs;
  std::vector<detail::heap::where> sources;  // an incremental step's: the moves' arenas

  // Operations until shuffle_every asks for a shuffle: a countdown, as a modulo would
  // put a division on every rent and return.
  std::uint64_t ops_left = 0;
  // Every counter of stats() that the heap and the table do not keep themselves.
  shuffler_stats counters;

  std::size_t stored_bytes(const entry& e) const noexcept { return e.size + tag_bytes; }
  std::byte* plaintext_of(const entry& e) const noexcept {
    return window_resource != nullptr ? reinterpret_cast<std::byte*>(static_cast<std::uintptr_t>(e.aux)) : e.data;
  }
  // Whether renting or returning the entry does work outside the lock.
  bool needs_work() const noexcept { return encrypting || window_resource != nullptr; }
  // Opening or sealing a small CTR entry (about 45 ns for 64 bytes) costs less than
  // releasing the lock, taking it again and waking waiters; GCM's fixed cost is higher.
  static constexpr std::size_t small_entry_bytes = 256;
  static constexpr std::size_t spare_window_bytes = 4096;
  bool work_under_lock(std::size_t bytes) const noexcept { return tag_bytes == 0 && bytes <= small_entry_bytes; }
  // A window for e (the spare if it fits), and its wiped return.
  std::byte* take_window(const entry& e);
  void give_window(window_block w) noexcept;
  std::span<const std::byte> aad_span(const std::array<std::byte, 8>& aad) const noexcept {
    return tag_bytes != 0 ? std::span<const std::byte>(aad) : std::span<const std::byte>();
  }
  shuffler_stats stats() const noexcept;

  // --- entries ------------------------------------------------------------------------

  handle alloc(std::size_t bytes, std::size_t alignment);
  // Returns false when the entry's last lease is ending (sealing): wait, then call again.
  bool free(handle h);
  // free for sealed<T>: now, or when the last lease ends; never throws.
  void free_when_returned(handle h) noexcept;

  entry& find_live(handle h);

  void drop_window(const entry& e) noexcept;

  // Frees slot i: its handles are invalid at once, its bytes wait for the next shuffle.
  void doom(std::uint32_t i) noexcept;

  // An open entry is freed: wipe its plaintext.
  void doom_open(std::uint32_t i) noexcept;

  // --- policies -----------------------------------------------------------------------

  void count_op() noexcept;

  void check_ratio() noexcept;


  // --- shuffling ----------------------------------------------------------------------

  // Adds the time from its making to its end to shuffle_time, also when what it times
  // throws.
  struct shuffle_timer {
    shuffler_stats& counters;
    const std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    ~shuffle_timer() {
      counters.shuffle_time +=
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
    }
  };

  // A full shuffle, rolling (docs/design.md, "Heap"): the entries at rest leave their
  // arenas interleaved at random, each into room that entries read before it left, so
  // the upstream holds the heap plus two arenas at the peak (pinned entries or not). It
  // runs in parts of bounded work (begin_full(), then shuffle_part() until it returns
  // false), and the caller may release the lock between parts: meanwhile the heap is
  // held (arenas keep their numbers, new entries go to arenas of their own), and an
  // entry pinned when its turn comes stays where it is.
  // Throws std::bad_alloc, nothing changed.
  void begin_full();
  // The plan's room faulted in, for the thread running the full shuffle to call with the
  // lock released after begin_full (no other thread touches the plan): on huge pages the
  // grow parts would otherwise stop for a whole huge page's first touch each.
  void fault_in_plan() noexcept;
  // Returns whether parts remain. Only the parts before the first move can fail: on
  // std::bad_alloc the shuffle is abandoned and nothing changed.
  bool shuffle_part();
  bool full_active() const noexcept { return full.at != full_state::phase::idle; }

  struct full_state {
    // grow: the plan's room, a part at a time; gather: the slots, a part at a time, the
    // entries at rest or pinned to their arena's run of plan (each run as long as the
    // arena's entries, so nothing is sorted), the freed ones to doomed; windows: one per arena with entries to move; sort: each window by address;
    // begin: the heap's plan begins; move: planned and moved a part at a time; drop:
    // the freed entries; end: the heap settles.
    enum class phase : std::uint8_t { idle, grow, gather, windows, sort, begin, move, drop, end };
    phase at = phase::idle;
    std::uint32_t cursor = 0;  // the phase's progress: slots, windows or freed entries
    std::uint32_t slots = 0;   // the slots when it began (later ones are newer entries)
    std::uint32_t arenas = 0;  // the arenas when it began (the shuffle's own)
    std::uint32_t total = 0;   // entries in those arenas
    std::vector<std::uint32_t> part;  // a move part's sequence
    std::uint32_t moves_per_part = 0;  // set as the moves begin
    // Entries not at rest when gathered, or taken from rest since (rented, or marked by
    // a key rotation): while there is none, no move need look at its slot again to see
    // whether it may still move.
    std::uint64_t unsettled = 0;
  } full;
  // A part's work: a few hundred microseconds of one core at 1 GiB (each slot or move
  // misses the cache). A move part takes part_moves entries, or as few as min_part_moves
  // large ones: about part_bytes, so a thread waiting for the lock (as often as four
  // times for a rent and its return) waits about as long whatever the entries' size.
  static constexpr std::uint32_t part_slots = 4096, part_moves = 256, min_part_moves = 16;
  static constexpr std::size_t part_bytes = 128 * 1024;

  void gather_part();
  void sort_part();
  void begin_moves();
  void move_part();
  void drop_part() noexcept;
  void end_full() noexcept;

  // The policies' compaction (docs/design.md, "Shuffle policies"). One walk over the
  // slots tallies each arena's bytes at rest and drops the freed entries; then the
  // sources are emptied a window of about one arena's worth at a time (in random order
  // within the window when randomize_layout) into the arena being filled, and each is
  // given back whole, wiped, as soon as its window has moved. So the heap never holds
  // old and new copies of everything at once; each window is all or nothing.
  // sparsest (the ratio policy): the sources are the sparsest arenas, as many as bring
  // reserved down to live + compaction_aim x the allowance (ratio - 1) x live; full
  // arenas stay as they are, so the bytes moved follow the bytes reclaimed.
  // every (shuffle_every): every arena is a source, and every entry at rest moves, so the
  // upstream never holds the old and new heap at once.
  enum class compact_scope : std::uint8_t { sparsest, every };
  static constexpr double compaction_aim = 0.25;
  void compact(compact_scope scope);
  // For the policies (check_ratio with sparsest, shuffle_every with every): a
  // compaction that finds no memory stops after its last whole window.
  void try_compact(compact_scope scope) noexcept;
  void tally_arenas();
  void choose_sources(compact_scope scope);
  void list_moves();
  void drop_freed(std::uint32_t slot, std::uint32_t arena) noexcept;
  void drop_freed_of(std::size_t source, bool whole) noexcept;
  void empty_sources();

  // One step of the incremental shuffle: visits the pass's next slots while less than
  // budget bytes are planned, each slot visited with nothing to move counting as
  // slot_visit_bytes (so a step's time follows its budget however sparse the table);
  // the first slot visited is moved whatever its size. Freed entries met are dropped.
  // The pass's first step draws its order, its last gives emptied arenas back.
  static constexpr std::size_t slot_visit_bytes = 16;
  void shuffle(std::size_t budget);

  // Shuffle on return: the entry alone moves to a new place; without memory it stays.
  void relocate(std::uint32_t i) noexcept;

  // --- rent and return ----------------------------------------------------------------

  enum class outcome : std::uint8_t { done, altered, no_memory };
  enum class pinned : std::uint8_t { done, busy, work };

  // A rent whose first lease decrypts outside the lock.
  struct open_job {
    handle h;
    std::size_t size, alignment;  // of the type rented
    std::uint32_t index = 0;
    std::byte* data = nullptr;
    std::byte* window = nullptr;  // null: in place
    std::size_t bytes = 0;        // of the entry
    std::uint64_t seq = 0;
    bool written = false;
    const key_slot* key = nullptr;  // null: nothing to decrypt
    outcome result = outcome::done;
    rented out{nullptr, 0};
  };
  // done: out is set; busy: the entry is in transition, wait and call again.
  pinned pin_for_rent(open_job& job);
  void open_outside(open_job& job) const noexcept;
  // out is set; throws integrity_error or std::bad_alloc, the entry back at rest as it was.
  void commit_rent(open_job& job);

  // A return whose last lease encrypts outside the lock, under the current key.
  struct seal_job {
    handle h;
    std::uint32_t index = 0;
    std::uint16_t key_id = detail::no_key;
    // Taken under the lock: the key ring may grow while the work runs outside it.
    const key_slot* key = nullptr;
    std::uint64_t seq = 0;
    std::byte* data = nullptr;
    std::byte* window = nullptr;
    std::size_t bytes = 0;
    outcome result = outcome::done;
  };
  pinned pin_for_return(seal_job& job);
  void seal_outside(seal_job& job) const noexcept;
  // Throws std::bad_alloc when the cipher ran out of memory (the entry stays open).
  void commit_return(seal_job& job);

  // --- rotation -----------------------------------------------------------------------

  // Re-encryption runs in batches of at most this many bytes: under the lock a batch of
  // entries at rest under an older key is marked sealing (nobody else touches their
  // bytes then) and given counter values; outside it the batch is re-encrypted in a
  // scratch buffer of secret memory and copied back; under the lock again each entry
  // is committed. So a rotation holds the lock only for bookkeeping, never for its AES
  // work, and no more than a batch of plaintext exists at once (a CTR entry larger than
  // a batch is re-encrypted a batch of it at a time; a GCM one needs its whole size).
  static constexpr std::size_t rotation_batch_bytes = 64 * 1024;
  static constexpr std::size_t rotation_batch_entries = 256;

  struct reseal {
    std::uint32_t index;
    handle h;  // read under the lock: the table may grow while the batch is worked on
    // The old key twice: the pointer for the AES work outside the lock (the key ring
    // may grow meanwhile), the id to drop its user once committed.
    const key_slot* from;
    std::uint16_t from_id, to_id;
    std::uint64_t from_seq, to_seq;
    std::byte* data;
    std::size_t size, offset;  // offset: where it is worked on in the scratch buffer
    outcome result;
  };

  // The scratch buffer of a rotation, from secret memory.
  class scratch_buffer {
   public:
    explicit scratch_buffer(std::pmr::memory_resource* r) noexcept : r_(r) {}
    ~scratch_buffer() { reset(0); }
    scratch_buffer(const scratch_buffer&) = delete;
    scratch_buffer& operator=(const scratch_buffer&) = delete;
    void reset(std::size_t bytes);  // wipes the old contents; on std::bad_alloc empty
    std::span<std::byte> bytes() const noexcept { return {p_, n_}; }

   private:
    std::pmr::memory_resource* r_;
    std::byte* p_ = nullptr;
    std::size_t n_ = 0;
  };
  std::pmr::memory_resource* scratch_resource() const noexcept;

  // A new current key; returns whether entries under older keys must be re-encrypted.
  // Everything that can fail comes first: on an exception nothing changed.
  bool begin_rotation(const key_type* key, const salt_type* salt, scratch_buffer& scratch,
                      std::vector<reseal>& batch);
  // Marks the next entries (from slot cursor on) to move to the current key; returns
  // where the walk stops.
  std::uint32_t mark_batch(std::uint32_t cursor, std::vector<reseal>& batch, scratch_buffer& scratch);
  // Outside the lock: decrypt a copy under the old key, encrypt it under the new one, and
  // copy it back only when whole, so a failure leaves the entry as it was.
  void reencrypt(reseal& r, const key_slot& k, std::span<std::byte> scratch) const noexcept;
  // Returns whether every entry of the batch moved to the new key or was found altered.
  bool commit_batch(std::span<const reseal> batch, std::uint16_t to) noexcept;
  // Whether rotate_key_every asks for a rotation now.
  bool rotation_due() const noexcept;
};

}  // namespace memshuffle
