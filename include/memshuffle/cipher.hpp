#pragma once
// The cipher seam: the shuffler seals and opens whole entries through this and never
// knows the algorithm. Crypto++ stays in lib/cipher.cpp.
//
// Custody (docs/security.md, "The cipher's custody"): between calls no raw key, AES
// key schedule, GCM hash key or keystream of a cipher lies outside secret memory, and
// every call clears the vector registers on its way out.
#include <array>
#include <cstddef>
#include <memory>
#include <memory_resource>
#include <span>

namespace memshuffle {

/// The algorithm of a cipher.
enum class cipher_kind {
  none,         ///< no encryption: data is left as it is
  aes_256_ctr,  ///< AES-256 in counter mode, unauthenticated
  aes_256_gcm,  ///< AES-256-GCM, authenticated
};

/// A 256-bit key.
using key_type = std::array<std::byte, 32>;
/// An 8-byte salt.
using salt_type = std::array<std::byte, 8>;

/// Seals and opens byte ranges, in place or from one range into another, under one key; the key material lives in
/// secret memory. Thread safe for seal() and open().
class cipher {
 public:
  static constexpr std::size_t key_size = 32;        ///< bytes of key every kind takes
  static constexpr std::size_t ctr_iv_size = 16;     ///< a full initial counter block
  static constexpr std::size_t gcm_nonce_size = 12;  ///< the recommended GCM nonce size
  static constexpr std::size_t gcm_tag_size = 16;    ///< bytes of tag GCM writes

  /// \effects Makes a cipher of `kind` under `key`. The expanded key (and, for GCM,
  ///          the hash key tables of each pooled GCM object, of one reserve
  ///          encryption object keyed now, and a copy of the key, which keys new
  ///          ones) live in memory from `secret_resource`, the library's secret
  ///          memory when it is null; the heap holds none of them. The caller's key
  ///          bytes are not kept.
  /// \throws std::invalid_argument when key.size() != key_size or kind is not one of
  ///         the enumerators; std::bad_alloc (or what secret_resource throws).
  /// \requires secret_resource, when given, outlives the cipher and is thread safe.
  cipher(cipher_kind kind, std::span<const std::byte> key,
         std::pmr::memory_resource* secret_resource = nullptr);
  /// \effects Wipes and frees the key material. In a child process made by fork()
  ///          it gives the secret memory back without reading or writing its bytes
  ///          (with memfd_secret they are not mapped there).
  ~cipher();
  /// \effects Takes other's state; other then throws std::logic_error from seal/open.
  cipher(cipher&& other) noexcept;
  /// \effects Destroys this cipher's state (as the destructor) and takes other's.
  cipher& operator=(cipher&& other) noexcept;
  cipher(const cipher&) = delete;
  cipher& operator=(const cipher&) = delete;

  /// \returns The kind given at construction (none after being moved from).
  cipher_kind kind() const noexcept;
  /// \returns The bytes of authentication tag that seal() writes (0 for none and CTR).
  std::size_t tag_size() const noexcept;

  /// \effects Encrypts data in place. CTR: iv is the full 16-byte initial counter
  ///          block, incremented as a 128-bit big-endian number per block. GCM: iv is
  ///          the nonce (12 bytes recommended), aad is authenticated, tag receives
  ///          gcm_tag_size bytes. none: data is left as it is. Clears the vector
  ///          registers before returning or throwing. Safe to call from several
  ///          threads at once on one cipher. Needs no memory: when GCM has no pooled
  ///          object free and cannot make one, it seals with the reserve object made
  ///          at construction (threads in that case take turns).
  /// \throws std::invalid_argument when iv, aad or tag do not fit the kind (CTR: iv
  ///         not 16 bytes, aad or tag not empty; GCM: iv empty, tag not 16 bytes;
  ///         none: tag not empty), data then unchanged; memshuffle::fork_error in a
  ///         child process made by fork() after construction; std::logic_error after
  ///         being moved from. Never std::bad_alloc.
  void seal(std::span<const std::byte> iv, std::span<const std::byte> aad,
            std::span<std::byte> data, std::span<std::byte> tag) const;

  /// \effects Decrypts data in place (the inverse of seal() with the same iv and aad).
  ///          Clears the vector registers before returning or throwing. Safe to call
  ///          from several threads at once on one cipher.
  /// \throws memshuffle::integrity_error (GCM) when the tag does not match data, aad
  ///         and iv, data then unchanged; std::bad_alloc when a GCM object cannot be
  ///         made; otherwise as seal().
  void open(std::span<const std::byte> iv, std::span<const std::byte> aad,
            std::span<std::byte> data, std::span<const std::byte> tag) const;

  /// \effects As seal(iv, aad, data, tag), reading the plaintext from `in` and writing
  ///          the ciphertext to `out`: no copy of the plaintext is needed where the
  ///          ciphertext is to be kept. `in` and `out` are one range or do not overlap.
  /// \throws As seal(), and std::invalid_argument when in.size() != out.size(); out
  ///         then unchanged.
  void seal(std::span<const std::byte> iv, std::span<const std::byte> aad, std::span<const std::byte> in,
            std::span<std::byte> out, std::span<std::byte> tag) const;

  /// \effects As open(iv, aad, data, tag), reading the ciphertext from `in` and writing
  ///          the plaintext to `out`. `in` and `out` are one range or do not overlap.
  /// \throws As open(), and std::invalid_argument when in.size() != out.size(). On
  ///         integrity_error `in` is unchanged and `out` holds zeros (it held
  ///         unverified plaintext), or, when `in` and `out` are one range, the
  ///         ciphertext as it came.
  void open(std::span<const std::byte> iv, std::span<const std::byte> aad, std::span<const std::byte> in,
            std::span<std::byte> out, std::span<const std::byte> tag) const;

  /// \effects Re-encrypts `data` in place from `from`'s key to this cipher's: opens it
  ///          under `from` with `from_iv`, `aad` and the tag in `tag`, and seals it
  ///          under this cipher with `to_iv` and `aad`, writing the new tag into `tag`.
  ///          The plaintext passes only through `scratch`, at most scratch.size()
  ///          bytes of it at a time, and the scratch is wiped before returning: a
  ///          message larger than the scratch goes piece by piece (GCM first checks
  ///          the old tag over the whole message, in a pass that decrypts into the
  ///          scratch only, and only then re-encrypts).
  /// \throws memshuffle::integrity_error (GCM) when the old tag does not match: data
  ///         and tag then unchanged; std::invalid_argument when the two ciphers differ
  ///         in kind, a message larger than the scratch meets a scratch of less than
  ///         one 16-byte block, or the arguments do not fit the kind (as seal()):
  ///         data then unchanged; std::bad_alloc when a GCM object cannot be made:
  ///         data unchanged; otherwise as seal().
  void reseal(const cipher& from, std::span<const std::byte> from_iv, std::span<const std::byte> to_iv,
              std::span<const std::byte> aad, std::span<std::byte> data, std::span<std::byte> tag,
              std::span<std::byte> scratch) const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace memshuffle
