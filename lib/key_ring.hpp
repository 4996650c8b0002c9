#pragma once
// The shuffler's keys: the current one, and older ones that entries at rest are still
// under. Each key, with its salt and its encryption counter, lives in the library's
// secret memory (docs/design.md, "The key ring"), never in the heap; a key no entry
// needs any more is destroyed and wiped at once. Not synchronized: the shuffler calls
// it under its lock; the ciphers themselves may seal and open from several threads.
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory_resource>
#include <span>
#include <vector>

#include <memshuffle/cipher.hpp>

#include "handle_table.hpp"

namespace memshuffle::detail {

// Every encryption under the key takes the next counter value, so no counter block is
// ever used twice under it.
struct key_slot {
  key_slot(cipher_kind kind, std::span<const std::byte> key, const salt_type& s, std::uint64_t first_seq)
      : c(kind, key), salt(s), next_seq(first_seq) {}

  cipher c;
  salt_type salt;
  std::uint64_t next_seq;  // starts at a random value, then counts up (mod 2^64)
  std::uint64_t encryptions = 0;
  std::size_t users = 0;    // entries whose ciphertext is, or is being made, under this key
  std::size_t sealing = 0;  // encryptions under way outside the lock
};

class key_ring {
 public:
  explicit key_ring(cipher_kind kind);
  ~key_ring();  // every key destroyed and wiped
  key_ring(const key_ring&) = delete;
  key_ring& operator=(const key_ring&) = delete;

  // Adds a key and makes it current; the previous current key goes when unused. Null
  // key or salt: a random one (pointers, so no copy of a key is made on the way).
  // On an exception nothing changed.
  void rotate_to(const key_type* key, const salt_type* salt);

  std::uint16_t current_id() const noexcept { return current_; }
  key_slot& current() noexcept { return *slots_[current_]; }
  key_slot& operator[](std::uint16_t id) noexcept { return *slots_[id]; }
  const key_slot& operator[](std::uint16_t id) const noexcept { return *slots_[id]; }

  // The next counter value of the current key for one encryption outside the lock: the
  // key now has one more user and one more encryption under way.
  std::uint64_t begin_seal() noexcept;
  // One entry no longer needs key id; the key goes when nobody needs it.
  void drop_user(std::uint16_t id) noexcept;
  // A key that is not current, that no entry needs and that nothing seals under goes.
  void drop_if_unused(std::uint16_t id) noexcept;
  void drop_all_unused() noexcept;
  // Whether an encryption is under way under a key that is no longer current.
  bool sealing_under_older() const noexcept;

 private:
  std::uint16_t add(const key_type* key, const salt_type* salt);
  void destroy(key_slot* k) noexcept;

  cipher_kind kind_;
  // Secret memory; the heap under cipher none, which has no key material to keep.
  std::pmr::memory_resource* memory_;
  std::vector<key_slot*> slots_;  // the pointers in the heap, the keys in secret memory
  std::uint16_t current_ = no_key;
};

// The key and salt of shard `shard` (>= 1) of a shuffler whose shard 0 is under `key`
// and `salt` (shuffler_options::shards): the first 40 bytes of AES-256 under `key` of
// the counter blocks salt || FF FF FF FF || be16(shard) || 00 0j, j = 0, 1, 2, written
// straight into out_key and out_salt (give them secret memory). No entry's counter
// block has FF in its bytes 8 to 11 (GCM puts zeros there, a CTR entry counts its blocks
// from 0 and never reaches 2^63), so no derived byte is keystream an entry was
// encrypted with, and the shards' keys differ from each other and from `key`.
void derive_shard_key(const key_type& key, const salt_type& salt, std::uint16_t shard, key_type& out_key,
                      salt_type& out_salt);

// CTR initial counter block: (salt XOR be64(seq)) || be64(block), the low half counting
// the entry's blocks from 0. The GCM nonce is its first 12 bytes.
inline std::array<std::byte, 16> counter_block(const key_slot& k, std::uint64_t seq, std::uint64_t block = 0) {
  std::array<std::byte, 16> iv{};
  for (int i = 0; i < 8; ++i) {
    iv[i] = k.salt[i] ^ static_cast<std::byte>(seq >> (56 - 8 * i));
    iv[8 + i] = static_cast<std::byte>(block >> (56 - 8 * i));
  }
  return iv;
}

inline std::span<const std::byte> iv_for(const key_slot& k, const std::array<std::byte, 16>& block) {
  return k.c.kind() == cipher_kind::aes_256_gcm ? std::span(block).first(cipher::gcm_nonce_size)
                                                 : std::span(block);
}

// The GCM associated data of an entry: its handle, big-endian.
inline std::array<std::byte, 8> be64(std::uint64_t v) {
  std::array<std::byte, 8> out{};
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>(v >> (56 - 8 * i));
  return out;
}

}  // namespace memshuffle::detail
