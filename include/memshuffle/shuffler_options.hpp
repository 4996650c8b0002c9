#pragma once
// The plain structs that configure a shuffler and report on it. Designated
// initializers work: shuffler_options{.cipher = cipher_kind::aes_256_gcm}.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory_resource>
#include <optional>

#include <memshuffle/cipher.hpp>

namespace memshuffle {

/// How a shuffler encrypts, shuffles and shows plaintext.
struct shuffler_options {
  /// The cipher of the entries at rest.
  cipher_kind cipher = cipher_kind::aes_256_ctr;
  /// The first key; random when absent. The shuffler wipes its copy once the key is in
  /// the library's secret memory.
  std::optional<key_type> key{};
  /// The first salt; random when absent. Wiped as the key is.
  std::optional<salt_type> salt{};
  /// When an entry's last lease ends, the entry alone moves to a new place.
  bool shuffle_on_return = false;
  /// Operations (alloc, create, free, rent, return) between automatic shuffles; 0 = never.
  std::size_t shuffle_every = 0;
  /// Reserved / live bytes above which an alloc compacts the heap; 0 = never.
  double shuffle_above_ratio = 0;
  /// Whether a shuffle draws a random layout (otherwise it keeps the order).
  bool randomize_layout = true;
  /// Bytes of one arena taken from the upstream.
  std::size_t arena_size = 64 * 1024;
  /// Where a lease shows plaintext (its window), and where a key rotation works:
  /// null means the library's secret memory (locked, left out of core dumps, gone in a
  /// child of fork()).
  std::pmr::memory_resource* plaintext_resource = nullptr;
  /// Opt-in: a lease decrypts in place in the arena, with no window. Saves a copy and
  /// the window's memory, and gives up that plaintext stays out of the upstream's
  /// memory (which may be swapped out or written to a core dump) while a lease is open.
  /// Excludes a plaintext_resource.
  bool plaintext_in_place = false;
  /// Take a fresh random key after this many encryptions under the current one; 0 = never.
  std::size_t rotate_key_every = 0;
  /// Independent parts (1 to 64), each with its own lock, handle table, heap and key:
  /// a thread allocates in the shard of its ordinal, and every other call on an entry
  /// goes to the entry's shard, so threads that use their own entries do not wait for
  /// each other. Shards are made when a thread first needs one; a process with one
  /// thread uses one. 1: one lock for everything.
  std::size_t shards = 8;
};

/// What a shuffler holds and has done.
struct shuffler_stats {
  std::size_t live_entries = 0;    ///< allocated and not freed
  std::size_t live_bytes = 0;      ///< their sizes, as requested
  std::size_t reserved_bytes = 0;  ///< held from the upstream by the arenas
  std::size_t arenas = 0;          ///< arenas held
  std::size_t metadata_bytes = 0;  ///< the handle table: 32 bytes per slot
  std::uint64_t shuffles = 0;      ///< completed full and incremental shuffles and compactions
  std::uint64_t bytes_moved = 0;   ///< by shuffles and shuffle on return
  std::uint64_t arenas_released = 0;  ///< given back to the upstream
  std::uint64_t encryptions = 0;      ///< entries sealed (returns and re-encryptions)
  std::uint64_t decryptions = 0;      ///< entries opened (rents and re-encryptions)
  std::uint64_t key_rotations = 0;    ///< keys made current after the first
  std::chrono::nanoseconds shuffle_time{0};  ///< spent in shuffles
  std::size_t pinned_entries = 0;        ///< entries with at least one lease open
  std::size_t pending_free_entries = 0;  ///< freed, bytes not yet dropped by a shuffle
  std::uint64_t integrity_failures = 0;  ///< opens refused by the authenticated cipher
  std::uint64_t entries_relocated_on_return = 0;  ///< moves by shuffle on return
  /// Of metadata_bytes, those on memory advised to use transparent huge pages (a table
  /// of 65,536 slots or more, on Linux with them enabled); 0 where the table is smaller
  /// or the kernel has none: ordinary pages, the fallback.
  std::size_t metadata_huge_page_bytes = 0;
};

}  // namespace memshuffle
