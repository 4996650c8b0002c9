// AES-256-CTR and AES-256-GCM behind the cipher seam.
//
// The hot path never runs a key schedule: CTR keeps one expanded AES key and drives
// it through the const AdvancedProcessBlocks (counter mode in hardware), GCM keeps a
// small pool of GCM objects keyed once and only resynchronises them per call.
#include <memshuffle/cipher.hpp>
#include <memshuffle/error.hpp>

#include <crypto++/aes.h>
#include <crypto++/cpu.h>
#include <crypto++/gcm.h>
#include <crypto++/misc.h>
#include <crypto++/osrng.h>
#include <crypto++/secblock.h>

#include <algorithm>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

namespace memshuffle {

namespace {

using CryptoPP::byte;

constexpr std::size_t block_size = 16;

const byte* bytes(std::span<const std::byte> s) { return reinterpret_cast<const byte*>(s.data()); }
byte* bytes(std::span<std::byte> s) { return reinterpret_cast<byte*>(s.data()); }

// The counter block is one 128-bit big-endian number; it wraps modulo 2^128.
void add_to_counter(byte* counter, std::size_t n) {
  for (std::size_t i = block_size; i-- > 0 && n != 0;) {
    const std::size_t sum = counter[i] + (n & 0xFF);
    counter[i] = static_cast<byte>(sum);
    n = (n >> 8) + (sum >> 8);
  }
}

}  // namespace

struct cipher::impl {
  cipher_kind kind;
  CryptoPP::SecByteBlock key;

  // CTR: the expanded key. Without AES-NI, Crypto++'s table-driven AES uses a mutable
  // scratch block inside the key object, so calls are serialised then.
  CryptoPP::AES::Encryption aes;
  bool aes_shared_safely = CryptoPP::HasAESNI();
  mutable std::mutex aes_mutex;

  // GCM: mode objects keyed once, each used by one thread at a time.
  template <class Mode>
  class pool {
   public:
    explicit pool(const CryptoPP::SecByteBlock& key) : key_(key) {}
    struct lease {
      pool* owner;
      std::unique_ptr<Mode> mode;
      // Runs in destructors and noexcept paths: when the pool cannot grow, the mode
      // object is simply dropped (and keyed afresh by a later take()).
      ~lease() {
        std::lock_guard lock(owner->m_);
        try {
          owner->free_.push_back(std::move(mode));
        } catch (const std::bad_alloc&) {
        }
      }
      Mode* operator->() const { return mode.get(); }
    };
    lease take() {
      {
        std::lock_guard lock(m_);
        if (!free_.empty()) {
          auto m = std::move(free_.back());
          free_.pop_back();
          return {this, std::move(m)};
        }
      }
      auto m = std::make_unique<Mode>();
      // Crypto++ insists on an IV when keying; every call resynchronises anyway.
      const byte unused_iv[cipher::gcm_nonce_size] = {};
      m->SetKeyWithIV(key_, key_.size(), unused_iv, sizeof unused_iv);
      return {this, std::move(m)};
    }

   private:
    const CryptoPP::SecByteBlock& key_;
    std::mutex m_;
    std::vector<std::unique_ptr<Mode>> free_;
  };
  pool<CryptoPP::GCM<CryptoPP::AES>::Encryption> gcm_enc{key};
  pool<CryptoPP::GCM<CryptoPP::AES>::Decryption> gcm_dec{key};

  impl(cipher_kind k, std::span<const std::byte> key_bytes)
      : kind(k), key(bytes(key_bytes), key_bytes.size()) {
    if (kind != cipher_kind::none) aes.SetKey(key, key.size());
  }

  void ctr(std::span<const std::byte> iv, std::span<std::byte> data) const {
    std::unique_lock lock(aes_mutex, std::defer_lock);
    if (!aes_shared_safely) lock.lock();
    alignas(16) byte counter[block_size];
    std::copy_n(bytes(iv), block_size, counter);
    byte* p = bytes(data);
    std::size_t blocks = data.size() / block_size;
    const int flags = CryptoPP::BlockTransformation::BT_InBlockIsCounter |
                      CryptoPP::BlockTransformation::BT_AllowParallel;
    while (blocks != 0) {
      // Crypto++ increments only the last counter byte; the carry into the rest of
      // the 128-bit block is ours.
      const std::size_t run = std::min<std::size_t>(blocks, 256 - counter[block_size - 1]);
      alignas(16) byte start[block_size];
      std::copy_n(counter, block_size, start);
      aes.AdvancedProcessBlocks(start, p, p, run * block_size, flags);
      add_to_counter(counter, run);
      p += run * block_size;
      blocks -= run;
    }
    if (const std::size_t tail = data.size() % block_size; tail != 0) {
      alignas(16) byte pad[block_size];
      aes.ProcessBlock(counter, pad);
      for (std::size_t i = 0; i < tail; ++i) p[i] ^= pad[i];
      CryptoPP::SecureWipeBuffer(pad, block_size);
    }
    CryptoPP::SecureWipeBuffer(counter, block_size);
  }
};

cipher::cipher(cipher_kind kind, std::span<const std::byte> key) {
  if (key.size() != key_size)
    throw std::invalid_argument("memshuffle::cipher: the key must be 32 bytes, got " +
                                std::to_string(key.size()));
  if (kind != cipher_kind::none && kind != cipher_kind::aes_256_ctr &&
      kind != cipher_kind::aes_256_gcm)
    throw std::invalid_argument("memshuffle::cipher: unknown cipher_kind");
  impl_ = std::make_unique<impl>(kind, key);
}

cipher::~cipher() = default;
cipher::cipher(cipher&&) noexcept = default;
cipher& cipher::operator=(cipher&&) noexcept = default;

cipher_kind cipher::kind() const noexcept { return impl_ ? impl_->kind : cipher_kind::none; }

std::size_t cipher::tag_size() const noexcept {
  return kind() == cipher_kind::aes_256_gcm ? gcm_tag_size : 0;
}

namespace {

void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("memshuffle::cipher: ") + what);
}

void check_arguments(const cipher& c, std::span<const std::byte> iv, std::size_t aad_size,
                     std::size_t tag_size) {
  switch (c.kind()) {
    case cipher_kind::none:
      check(tag_size == 0, "the none cipher takes no tag");
      break;
    case cipher_kind::aes_256_ctr:
      check(iv.size() == cipher::ctr_iv_size, "CTR needs a 16-byte initial counter block");
      check(aad_size == 0, "CTR cannot authenticate associated data");
      check(tag_size == 0, "CTR writes no tag");
      break;
    case cipher_kind::aes_256_gcm:
      check(!iv.empty(), "GCM needs a non-empty nonce");
      check(tag_size == cipher::gcm_tag_size, "GCM needs a 16-byte tag");
      break;
  }
}

// What seal and open share: the checks, and the kinds whose work is the same both ways
// (none does nothing, CTR is its own inverse). True when GCM work is left to do.
template <class Impl>
bool symmetric_part(const Impl* impl, const cipher& c, std::span<const std::byte> iv, std::size_t aad_size,
                    std::span<std::byte> data, std::size_t tag_size) {
  if (impl == nullptr) throw std::logic_error("memshuffle::cipher: used after being moved from");
  check_arguments(c, iv, aad_size, tag_size);
  if (impl->kind == cipher_kind::aes_256_ctr) impl->ctr(iv, data);
  return impl->kind == cipher_kind::aes_256_gcm;
}

}  // namespace

void cipher::seal(std::span<const std::byte> iv, std::span<const std::byte> aad,
                  std::span<std::byte> data, std::span<std::byte> tag) const {
  if (!symmetric_part(impl_.get(), *this, iv, aad.size(), data, tag.size())) return;
  auto gcm = impl_->gcm_enc.take();
  gcm->EncryptAndAuthenticate(bytes(data), bytes(tag), tag.size(), bytes(iv), iv.size(),
                              bytes(aad), aad.size(), bytes(data), data.size());
}

void cipher::open(std::span<const std::byte> iv, std::span<const std::byte> aad,
                  std::span<std::byte> data, std::span<const std::byte> tag) const {
  if (!symmetric_part(impl_.get(), *this, iv, aad.size(), data, tag.size())) return;
  auto gcm = impl_->gcm_dec.take();
  // One pass: the tag is computed over the ciphertext while it is decrypted in place.
  // On a mismatch the same keystream is applied again, which restores the ciphertext,
  // so the caller's bytes end exactly as they came.
  const bool ok = gcm->DecryptAndVerify(bytes(data), bytes(tag), tag.size(), bytes(iv), iv.size(),
                                        bytes(aad), aad.size(), bytes(data), data.size());
  if (!ok) {
    gcm->Resynchronize(bytes(iv), static_cast<int>(iv.size()));
    gcm->ProcessString(bytes(data), data.size());
    throw integrity_error("memshuffle::cipher: the GCM tag does not match (data, "
                          "associated data or nonce altered)");
  }
}

}  // namespace memshuffle
