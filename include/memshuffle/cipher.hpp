#pragma once
// The cipher seam: the shuffler seals and opens whole entries through this and never
// knows the algorithm. Crypto++ stays in lib/cipher.cpp.
#include <array>
#include <cstddef>
#include <memory>
#include <span>

namespace memshuffle {

enum class cipher_kind { none, aes_256_ctr, aes_256_gcm };

using key_type = std::array<std::byte, 32>;
using salt_type = std::array<std::byte, 8>;

class cipher {
 public:
  static constexpr std::size_t key_size = 32;
  static constexpr std::size_t ctr_iv_size = 16;   // a full initial counter block
  static constexpr std::size_t gcm_nonce_size = 12;  // the recommended GCM nonce size
  static constexpr std::size_t gcm_tag_size = 16;

  // key must be key_size bytes (std::invalid_argument otherwise); the cipher keeps
  // its own copy in wiped memory.
  cipher(cipher_kind kind, std::span<const std::byte> key);
  ~cipher();
  cipher(cipher&&) noexcept;
  cipher& operator=(cipher&&) noexcept;
  cipher(const cipher&) = delete;
  cipher& operator=(const cipher&) = delete;

  cipher_kind kind() const noexcept;
  // Bytes of authentication tag that seal() writes (0 for none and CTR).
  std::size_t tag_size() const noexcept;

  // Encrypt data in place. CTR: iv is the full 16-byte initial counter block,
  // incremented as a 128-bit big-endian number per block; aad and tag must be empty.
  // GCM: iv is the nonce (any non-empty length; 12 bytes recommended), aad is
  // authenticated, tag receives gcm_tag_size bytes. none: data is left as it is.
  // Safe to call from several threads at once on one cipher.
  void seal(std::span<const std::byte> iv, std::span<const std::byte> aad,
            std::span<std::byte> data, std::span<std::byte> tag) const;

  // Decrypt data in place; GCM throws integrity_error (data then unchanged) when the
  // tag does not match data, aad and iv.
  void open(std::span<const std::byte> iv, std::span<const std::byte> aad,
            std::span<std::byte> data, std::span<const std::byte> tag) const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace memshuffle
