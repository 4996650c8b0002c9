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

struct shuffler_options {
  cipher_kind cipher = cipher_kind::aes_256_ctr;
  std::optional<key_type> key{};    // random when absent
  std::optional<salt_type> salt{};  // random when absent
  // A returned entry (its last lease ended) moves alone to a new place.
  bool shuffle_on_borrow_return = false;
  std::size_t shuffle_every = 0;   // operations (alloc, create, free, rent, return); 0 = never
  double shuffle_above_ratio = 0;  // reserved / live bytes after an alloc; 0 = never
  bool randomize_layout = true;
  std::size_t arena_size = 64 * 1024;
  // Non-null: a lease decrypts into a buffer from this resource instead of in place.
  std::pmr::memory_resource* plaintext_resource = nullptr;
  // Take a fresh random key after this many encryptions under the current one; 0 = never.
  std::size_t rotate_key_every = 0;
};

struct shuffler_stats {
  std::size_t live_entries = 0;    // allocated and not freed
  std::size_t live_bytes = 0;      // their sizes, as requested
  std::size_t reserved_bytes = 0;  // held from the upstream by the arenas
  std::size_t arenas = 0;
  std::size_t metadata_bytes = 0;  // the handle table: 32 bytes per slot
  std::uint64_t shuffles = 0;      // completed full shuffles and incremental passes
  std::uint64_t bytes_moved = 0;
  std::uint64_t arenas_released = 0;
  std::uint64_t encryptions = 0;
  std::uint64_t decryptions = 0;
  std::uint64_t key_rotations = 0;
  std::chrono::nanoseconds shuffle_time{0};
  // Additions beyond the architecture page.
  std::size_t pinned_entries = 0;        // entries with at least one lease open
  std::size_t pending_free_entries = 0;  // freed, bytes not yet dropped by a shuffle
  std::uint64_t integrity_failures = 0;  // opens refused by the authenticated cipher
  std::uint64_t entries_relocated_on_return = 0;
};

}  // namespace memshuffle
