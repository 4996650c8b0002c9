#pragma once
// The shuffler's state, behind its pointer to implementation. One mutex guards the
// table, the heap, the keys and the statistics; the cipher work of rent, return and
// key rotation runs outside it while the entries concerned are marked opening or
// sealing, which keeps every other thread (and shuffle) away from their bytes.
// Its members are defined in three files: shuffler.cpp (keys, entries, policies, rent
// and return, and the public members), shuffle_passes.cpp (the full shuffle, the
// compaction, the incremental pass, the move on return) and key_rotation.cpp.
#include <memshuffle/shuffler.hpp>

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <memory_resource>
#include <mutex>
#include <span>
#include <vector>

#include <crypto++/secblock.h>

#include "handle_table.hpp"
#include "heap.hpp"
#include "key_slot.hpp"
#include "layout_rng.hpp"

namespace memshuffle {

struct shuffler::impl {
  using entry = detail::entry;
  using entry_state = detail::entry_state;
  using key_slot = detail::key_slot;
  using layout_rng = detail::layout_rng;

  impl(const shuffler_options& o, std::pmr::memory_resource* up);
  ~impl();

  shuffler_options opt;
  std::pmr::memory_resource* upstream;
  const bool encrypting;
  const std::size_t tag_bytes;
  bool on_return;

  mutable std::mutex m;
  std::condition_variable cv;  // an entry left opening or sealing
  detail::handle_table table;
  detail::heap heap;
  std::vector<std::unique_ptr<key_slot>> keys;
  std::uint16_t current_key = detail::no_key;
  layout_rng rng;

  // The incremental pass under way.
  struct pass_state {
    bool active = false;
    std::vector<std::uint32_t> order;
    std::size_t cursor = 0;
    std::uint64_t serial = 0;  // arenas older than this are being emptied
  } pass;

  // Reused between shuffles so a steady heap does not allocate for them.
  std::vector<std::uint32_t> moves, doomed, run_end;
  std::vector<std::size_t> run_bytes;
  struct move_item {
    std::byte* src;
    std::size_t bytes;
    std::uint32_t index, align_log2;
  };
  std::vector<move_item> items;
  std::vector<detail::move> plan;  // a full shuffle's moves, by source arena, in slot order
  std::vector<std::uint32_t> placement;  // the order plan's moves are placed in
  std::vector<detail::window> windows;
  std::vector<std::byte*> stays, dest;
  std::vector<detail::request> reqs;

  std::uint64_t ops = 0;
  std::size_t live_entries = 0, live_bytes = 0, pinned = 0, pending_free = 0;
  std::uint64_t shuffles = 0, bytes_moved = 0, encryptions = 0, decryptions = 0,
                key_rotations = 0, integrity_failures = 0, relocated_on_return = 0;
  std::chrono::nanoseconds shuffle_time{0};

  std::size_t stored_bytes(const entry& e) const noexcept { return e.size + tag_bytes; }
  std::byte* plaintext_of(const entry& e) const noexcept {
    return opt.plaintext_resource != nullptr ? reinterpret_cast<std::byte*>(static_cast<std::uintptr_t>(e.aux))
                                             : e.data;
  }
  // Whether renting or returning the entry does work outside the lock.
  bool needs_work() const noexcept { return encrypting || opt.plaintext_resource != nullptr; }

  // --- keys -------------------------------------------------------------------------

  // Null key or salt: a random one. (Pointers, so no copy of a key is left behind.)
  std::uint16_t add_key(const key_type* key, const salt_type* salt);

  void drop_user(std::uint16_t id) noexcept;
  // A key that is not current and that no entry needs any more is destroyed (wiped).
  void drop_if_unused(std::uint16_t id) noexcept;

  // --- entries ------------------------------------------------------------------------

  entry& find_live(handle h);

  void drop_window(const entry& e) noexcept;

  // Frees slot i: its handles are invalid at once, its bytes wait for the next shuffle.
  void doom(std::uint32_t i) noexcept;

  // An entry left open with no lease (its encryption failed) is freed: wipe its plaintext.
  void doom_open(std::uint32_t i) noexcept;

  // --- policies -----------------------------------------------------------------------

  void count_op() noexcept;

  void check_ratio() noexcept;

  // shuffle_every: every entry at rest moves, arena by arena as the ratio policy's
  // compaction does, so the upstream never holds the old and new heap at once.
  void try_shuffle() noexcept;

  // --- shuffling ----------------------------------------------------------------------

  void timed(std::chrono::steady_clock::time_point t0) {
    shuffle_time += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
  }

  // A full shuffle, rolling (docs/design.md, "Heap"): the entries at rest leave their
  // arenas one source arena (a window) at a time, windows in random order and entries
  // in random order within each, and every arena emptied this way is a destination for
  // the windows after it. So the upstream holds the heap plus a few arenas at the
  // peak, and memory it already had is reused instead of fresh pages.
  void shuffle_all();

  // One pass over the slots: the entries at rest go to their arena's run of plan (each
  // arena's run is as long as the entries it holds, so nothing is sorted), the freed
  // ones to doomed, the pinned or in transition ones to stays; then one window per
  // arena with entries to move.
  void gather_by_arena();

  // With randomize_layout: the windows of about an arena's worth in random order, each
  // to an arena of its own, then the smaller ones in random order, packed; entries in
  // random order within each window. The new layout keeps no trace of the old one, yet
  // an arena's entries (which, after allocation, sit in neighbouring slots) stay
  // together, so both the slots and the bytes are walked nearly in order. (Packed in
  // random order, full windows would share arenas with random others, and after a few
  // shuffles every slot would lie in a random arena.) Without randomize_layout: arenas
  // in the order they were filled, entries by address, packed: the order is kept.
  void order_windows();

  // The ratio policy's compaction: entries move in address order, an arena's worth at a
  // time (in random order within that window when randomize_layout), and each source
  // arena goes back as soon as it is empty. So the heap never holds old and new copies
  // of everything at once, as a full shuffle does; each step is all or nothing.
  void compact();

  // One step of the incremental pass: moves at most about budget bytes (one entry at
  // least); the pass's first step draws its order, its last gives emptied arenas back.
  void shuffle_step(std::size_t budget);

  // Shuffle on return: the entry alone moves to a new place; without memory it stays.
  void relocate(std::uint32_t i) noexcept;

  // --- rotation -----------------------------------------------------------------------

  // Re-encryption runs in batches of about this many bytes: under the lock a batch of
  // entries at rest under an older key is marked sealing (nobody else touches their
  // bytes then) and given counter values; outside it the batch is re-encrypted in a
  // scratch buffer and copied back; under the lock again each entry is committed. So a
  // rotation of a large heap holds the lock only for bookkeeping, never for its AES work.
  static constexpr std::size_t rotation_batch_bytes = 64 * 1024;
  static constexpr std::size_t rotation_batch_entries = 256;

  struct reseal {
    std::uint32_t index;
    handle h;  // read under the lock: the table may grow while the batch is worked on
    // The old key twice: the pointer for the AES work outside the lock (the keys vector
    // may reallocate meanwhile), the id to drop its user once committed.
    const key_slot* from;
    std::uint16_t from_id;
    std::uint64_t from_seq, to_seq;
    std::byte* data;
    std::size_t size, offset;  // offset: where it is worked on in the scratch buffer
    enum class outcome : std::uint8_t { done, altered, no_memory } result;
  };

  void rotate(const key_type* key, const salt_type* salt, std::unique_lock<std::mutex>& lk);

  // Marks the next entries (from slot cursor on) to move to key `to`; returns where the
  // walk stops. The scratch buffer grows for an entry larger than it, alone in its batch.
  std::uint32_t mark_batch(std::uint32_t cursor, std::uint16_t to, std::vector<reseal>& batch,
                           CryptoPP::SecByteBlock& scratch);

  // Outside the lock: decrypt a copy under the old key, encrypt it under the new one, and
  // copy it back only when whole, so a failure leaves the entry as it was.
  void reencrypt(reseal& r, const key_slot& k, std::span<std::byte> scratch) const noexcept;

  // Returns whether every entry of the batch moved to the new key or was found altered.
  bool commit_batch(std::span<const reseal> batch, std::uint16_t to) noexcept;

  std::span<const std::byte> aad_span(const std::array<std::byte, 8>& aad) const noexcept {
    return tag_bytes != 0 ? std::span<const std::byte>(aad) : std::span<const std::byte>();
  }

  void maybe_rotate(std::unique_lock<std::mutex>& lk) noexcept;

  // --- rent and return ----------------------------------------------------------------

  rented rent(handle h, std::size_t size, std::size_t alignment);
  void give_back(handle h);
};

}  // namespace memshuffle
