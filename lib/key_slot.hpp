#pragma once
// One key of a shuffler, with its salt and its encryption counter, and the counter
// blocks and nonces made from them (docs/design.md, "Encryption at rest"). The counts
// are kept under the shuffler's lock; the cipher itself may seal and open from several
// threads at once.
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include <crypto++/secblock.h>

#include <memshuffle/cipher.hpp>

namespace memshuffle::detail {

// Every encryption under the key takes the next counter value, so no counter block is
// ever used twice under it.
struct key_slot {
  key_slot(cipher_kind kind, const CryptoPP::SecByteBlock& key, const CryptoPP::SecByteBlock& s,
           std::uint64_t first_seq)
      : c(kind, std::as_bytes(std::span(key.data(), key.size()))), salt(s), next_seq(first_seq) {}

  cipher c;
  CryptoPP::SecByteBlock salt;
  std::uint64_t next_seq;       // starts at a random value, then counts up (mod 2^64)
  std::uint64_t encryptions = 0;
  std::size_t users = 0;    // entries whose ciphertext is, or is being made, under this key
  std::size_t sealing = 0;  // encryptions under way outside the lock
};

// CTR initial counter block: (salt XOR be64(seq)) || be64(0), the low half counting
// the entry's blocks from 0. The GCM nonce is its first 12 bytes.
inline std::array<std::byte, 16> counter_block(const key_slot& k, std::uint64_t seq) {
  std::array<std::byte, 16> iv{};
  for (int i = 0; i < 8; ++i)
    iv[i] = static_cast<std::byte>(k.salt[i] ^ static_cast<std::uint8_t>(seq >> (56 - 8 * i)));
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
