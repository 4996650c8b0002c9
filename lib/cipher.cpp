// AES-256-CTR and AES-256-GCM behind the cipher seam.
//
// The hot path never runs a key schedule: CTR keeps one expanded AES key and drives
// it through the const AdvancedProcessBlocks (counter mode in hardware), GCM keeps a
// small pool of GCM objects keyed once and only resynchronises them per call.
//
// Custody (docs/security.md, "The cipher's custody"): every expanded key and every GCM
// hash key table lives in secret memory (lib/secret_crypto.hpp), so does the raw key
// (kept for GCM only, to key new pooled objects), what a call leaves in Crypto++'s heap
// buffers is wiped, and the vector registers are cleared on the way out of every call.
#include <memshuffle/cipher.hpp>
#include <memshuffle/error.hpp>
#include <memshuffle/secure_wipe.hpp>

#include "fork_epoch.hpp"
#include "secret_crypto.hpp"
#include "secret_memory.hpp"
#include "vector_registers.hpp"

#include <crypto++/cpu.h>
#include <crypto++/misc.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory_resource>
#include <mutex>
#include <optional>
#include <new>
#include <stdexcept>
#include <string>
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

// The GCM cipher's copy of the raw key, in secret memory (to key new pooled objects).
// In a fork child its bytes are not touched (with memfd_secret they have no mapping
// there); the resource's deallocate is safe there.
class secret_key {
 public:
  secret_key(std::pmr::memory_resource* resource, std::span<const std::byte> key)
      : resource_(resource), p_(static_cast<byte*>(resource->allocate(cipher::key_size, 16))) {
    std::memcpy(p_, key.data(), cipher::key_size);
  }
  ~secret_key() {
    if (detail::fork_epoch() == epoch_) secure_wipe(p_, cipher::key_size);
    resource_->deallocate(p_, cipher::key_size, 16);
  }
  secret_key(const secret_key&) = delete;
  secret_key& operator=(const secret_key&) = delete;
  const byte* data() const noexcept { return p_; }

 private:
  std::pmr::memory_resource* resource_;
  byte* p_;
  std::uint64_t epoch_ = detail::fork_epoch();
};

// GCM objects keyed once (their key material in secret memory), each used by one
// thread at a time.
template <class Mode>
class pool {
 public:
  explicit pool(std::pmr::memory_resource* secret) : secret_(secret) {}
  struct lease {
    pool* owner;
    std::unique_ptr<Mode> mode;
    // Runs in destructors and noexcept paths: when the pool cannot grow, the mode
    // object is dropped (its buffers wipe themselves) and keyed afresh later.
    ~lease() {
      if (!mode) return;
      mode->wipe_call_state();
      std::lock_guard lock(owner->m_);
      try {
        owner->free_.push_back(std::move(mode));
      } catch (const std::bad_alloc&) {
      }
    }
    Mode* operator->() const { return mode.get(); }
  };
  // Null mode when a new object cannot be made (no memory, heap or secret).
  lease try_take(const secret_key& key) noexcept {
    try {
      return take(key);
    } catch (...) {
      return {this, nullptr};
    }
  }
  lease take(const secret_key& key) {
    {
      std::lock_guard lock(m_);
      if (!free_.empty()) {
        auto m = std::move(free_.back());
        free_.pop_back();
        return {this, std::move(m)};
      }
    }
    auto m = std::make_unique<Mode>();
    m->key(key.data(), cipher::key_size, secret_);
    return {this, std::move(m)};
  }

 private:
  std::pmr::memory_resource* secret_;
  std::mutex m_;
  std::vector<std::unique_ptr<Mode>> free_;
};

// libcrypto++ is bound lazily: the first call of each of its internal paths runs the
// dynamic linker, which saves the vector registers (round keys, keystream, plaintext)
// on the stack. Running every path once under a throwaway key, before any real key is
// used, binds them all while the registers hold nothing secret.
void bind_crypto_paths() {
  const byte zero_key[cipher::key_size] = {}, nonce[16] = {}, aad[5] = {};
  alignas(16) byte data[100] = {}, tag[cipher::gcm_tag_size] = {};
  detail::secret_aes aes;
  aes.SetKey(zero_key, sizeof zero_key);
  const int flags = CryptoPP::BlockTransformation::BT_InBlockIsCounter |
                    CryptoPP::BlockTransformation::BT_AllowParallel;
  for (std::size_t blocks : {1, 2, 3, 4, 5, 6}) {
    alignas(16) byte counter[block_size] = {};
    aes.AdvancedProcessBlocks(counter, data, data, blocks * block_size, flags);
  }
  aes.ProcessBlock(nonce, data);
  detail::secret_gcm<true> enc;
  detail::secret_gcm<false> dec;
  enc.SetKeyWithIV(zero_key, sizeof zero_key, nonce, cipher::gcm_nonce_size);
  dec.SetKeyWithIV(zero_key, sizeof zero_key, nonce, cipher::gcm_nonce_size);
  for (std::size_t nonce_size : {cipher::gcm_nonce_size, sizeof nonce})
    for (std::size_t n : {std::size_t{0}, std::size_t{16}, sizeof data - 1}) {
      enc.EncryptAndAuthenticate(data, tag, sizeof tag, nonce, static_cast<int>(nonce_size), aad,
                                 sizeof aad, data, n);
      (void)dec.DecryptAndVerify(data, tag, sizeof tag, nonce, static_cast<int>(nonce_size), aad,
                                 sizeof aad, data, n);
      tag[0] ^= 1;
      (void)dec.DecryptAndVerify(data, tag, sizeof tag, nonce, static_cast<int>(nonce_size), aad,
                                 sizeof aad, data, n);
      dec.Resynchronize(nonce, static_cast<int>(nonce_size));
      dec.ProcessString(data, n);
    }
}

}  // namespace

struct cipher::impl {
  cipher_kind kind;
  std::uint64_t epoch = detail::fork_epoch();

  // CTR: the expanded key, in secret memory. Without AES-NI, Crypto++'s table-driven
  // AES uses a mutable scratch block inside the key object, so calls are serialised
  // then (and the block wiped after each).
  mutable detail::secret_aes aes;
  bool aes_shared_safely = CryptoPP::HasAESNI();
  mutable std::mutex aes_mutex;

  // GCM: the raw key, and the pooled objects it keys. The reserve, keyed at
  // construction, seals whenever the pool has no object free and cannot make one: a
  // seal then never needs memory, so a lease's end always seals its entry (threads
  // sealing at once then take turns on it).
  std::optional<secret_key> gcm_key;
  mutable pool<detail::secret_gcm<true>> gcm_enc;
  mutable pool<detail::secret_gcm<false>> gcm_dec;
  mutable std::optional<detail::secret_gcm<true>> gcm_reserve;
  mutable std::mutex gcm_reserve_mutex;

  impl(cipher_kind k, std::span<const std::byte> key, std::pmr::memory_resource* secret)
      : kind(k), gcm_enc(secret), gcm_dec(secret) {
    if (kind == cipher_kind::aes_256_ctr) aes.key(bytes(key), key.size(), secret);
    if (kind == cipher_kind::aes_256_gcm) {
      gcm_key.emplace(secret, key);
      gcm_reserve.emplace().key(bytes(key), key.size(), secret);
    }
  }

  void ctr(std::span<const std::byte> iv, std::span<const std::byte> in, std::span<std::byte> out) const {
    std::unique_lock lock(aes_mutex, std::defer_lock);
    if (!aes_shared_safely) lock.lock();
    alignas(16) byte counter[block_size];
    std::copy_n(bytes(iv), block_size, counter);
    const byte* from = bytes(in);
    byte* to = bytes(out);
    std::size_t blocks = in.size() / block_size;
    const int flags = CryptoPP::BlockTransformation::BT_InBlockIsCounter |
                      CryptoPP::BlockTransformation::BT_AllowParallel;
    alignas(16) byte start[block_size];
    while (blocks != 0) {
      // Crypto++ increments only the last counter byte; the carry into the rest of
      // the 128-bit block is ours.
      const std::size_t run = std::min<std::size_t>(blocks, 256 - counter[block_size - 1]);
      std::copy_n(counter, block_size, start);
      aes.AdvancedProcessBlocks(start, from, to, run * block_size, flags);
      add_to_counter(counter, run);
      from += run * block_size;
      to += run * block_size;
      blocks -= run;
    }
    if (const std::size_t tail = in.size() % block_size; tail != 0) {
      alignas(16) byte pad[block_size];
      aes.ProcessBlock(counter, pad);
      for (std::size_t i = 0; i < tail; ++i) to[i] = from[i] ^ pad[i];
      secure_wipe(pad, block_size);
    }
    secure_wipe(counter, block_size);
    secure_wipe(start, block_size);
    if (!aes_shared_safely) aes.wipe_scratch();
  }
};

cipher::cipher(cipher_kind kind, std::span<const std::byte> key,
               std::pmr::memory_resource* secret_resource) {
  if (key.size() != key_size)
    throw std::invalid_argument("memshuffle::cipher: the key must be 32 bytes, got " +
                                std::to_string(key.size()));
  if (kind != cipher_kind::none && kind != cipher_kind::aes_256_ctr &&
      kind != cipher_kind::aes_256_gcm)
    throw std::invalid_argument("memshuffle::cipher: unknown cipher_kind");
  const detail::vector_register_guard clear;  // keying leaves round keys in them
  static std::once_flag bound;
  if (kind != cipher_kind::none) std::call_once(bound, bind_crypto_paths);
  impl_ = std::make_unique<impl>(kind, key,
                                 secret_resource != nullptr ? secret_resource : detail::secret_memory());
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
// The checks every call makes before it touches anything.
template <class Impl>
const Impl& usable(const Impl* impl, const cipher& c, std::span<const std::byte> iv, std::size_t aad_size,
                   std::size_t tag_size) {
  if (impl == nullptr) throw std::logic_error("memshuffle::cipher: used after being moved from");
  // A child of fork() would reuse the parent's keystream: it gets no use of the key.
  if (detail::fork_epoch() != impl->epoch)
    throw fork_error("memshuffle::cipher: used in a child process made by fork(); a cipher "
                     "works only in the process that constructed it");
  check_arguments(c, iv, aad_size, tag_size);
  return *impl;
}

template <class Impl>
bool symmetric_part(const Impl* impl, const cipher& c, std::span<const std::byte> iv, std::size_t aad_size,
                    std::span<const std::byte> in, std::span<std::byte> out, std::size_t tag_size) {
  usable(impl, c, iv, aad_size, tag_size);
  check(in.size() == out.size(), "in and out differ in size");
  if (impl->kind == cipher_kind::aes_256_ctr) impl->ctr(iv, in, out);
  if (impl->kind == cipher_kind::none && !in.empty() && in.data() != out.data())
    std::memcpy(out.data(), in.data(), in.size());
  return impl->kind == cipher_kind::aes_256_gcm;
}

// Runs fn with a GCM encryption object: a pooled one, or the reserve when the pool has
// none free and cannot make one (so sealing never needs memory).
template <class Impl, class Fn>
void with_encryptor(const Impl& impl, Fn&& fn) {
  if (auto gcm = impl.gcm_enc.try_take(*impl.gcm_key); gcm.mode) {
    fn(*gcm.mode);
    return;
  }
  std::lock_guard lock(impl.gcm_reserve_mutex);
  const struct wipe_after {
    detail::secret_gcm<true>& gcm;
    ~wipe_after() { gcm.wipe_call_state(); }
  } reserve{*impl.gcm_reserve};
  fn(reserve.gcm);
}

// Scratch that held plaintext, wiped however the call ends.
struct wiped_on_exit {
  std::span<std::byte> s;
  ~wiped_on_exit() { secure_wipe(s.data(), s.size()); }
};

// The pieces of a message of n bytes that fit a scratch of `piece` bytes.
template <class Fn>
void for_each_piece(std::size_t n, std::size_t piece, Fn&& fn) {
  for (std::size_t at = 0; at < n; at += piece) fn(at, std::min(piece, n - at));
}

}  // namespace

void cipher::seal(std::span<const std::byte> iv, std::span<const std::byte> aad,
                  std::span<std::byte> data, std::span<std::byte> tag) const {
  seal(iv, aad, data, data, tag);
}

void cipher::open(std::span<const std::byte> iv, std::span<const std::byte> aad,
                  std::span<std::byte> data, std::span<const std::byte> tag) const {
  open(iv, aad, data, data, tag);
}

void cipher::seal(std::span<const std::byte> iv, std::span<const std::byte> aad, std::span<const std::byte> in,
                  std::span<std::byte> out, std::span<std::byte> tag) const {
  const detail::vector_register_guard clear;
  if (!symmetric_part(impl_.get(), *this, iv, aad.size(), in, out, tag.size())) return;
  with_encryptor(*impl_, [&](detail::secret_gcm<true>& gcm) {
    gcm.EncryptAndAuthenticate(bytes(out), bytes(tag), tag.size(), bytes(iv), iv.size(),
                               bytes(aad), aad.size(), bytes(in), in.size());
  });
}

void cipher::open(std::span<const std::byte> iv, std::span<const std::byte> aad, std::span<const std::byte> in,
                  std::span<std::byte> out, std::span<const std::byte> tag) const {
  const detail::vector_register_guard clear;
  if (!symmetric_part(impl_.get(), *this, iv, aad.size(), in, out, tag.size())) return;
  auto gcm = impl_->gcm_dec.take(*impl_->gcm_key);
  // One pass: the tag is computed over the ciphertext while it is decrypted. On a
  // mismatch the plaintext is not shown: in place, the same keystream is applied again,
  // which restores the ciphertext, so the caller's bytes end exactly as they came;
  // into another range, that range is wiped.
  const bool ok = gcm->DecryptAndVerify(bytes(out), bytes(tag), tag.size(), bytes(iv), iv.size(),
                                        bytes(aad), aad.size(), bytes(in), in.size());
  if (!ok) {
    if (in.data() == out.data()) {
      gcm->Resynchronize(bytes(iv), static_cast<int>(iv.size()));
      gcm->ProcessString(bytes(out), out.size());
    } else {
      secure_wipe(out.data(), out.size());
    }
    throw integrity_error("memshuffle::cipher: the GCM tag does not match (data, "
                          "associated data or nonce altered)");
  }
}

void cipher::reseal(const cipher& from, std::span<const std::byte> from_iv, std::span<const std::byte> to_iv,
                    std::span<const std::byte> aad, std::span<std::byte> data, std::span<std::byte> tag,
                    std::span<std::byte> scratch) const {
  check(from.kind() == kind(), "reseal needs two ciphers of one kind");
  if (data.size() <= scratch.size()) {  // one piece: an open into the scratch and a seal back
    const wiped_on_exit plain{scratch.first(data.size())};
    from.open(from_iv, aad, data, plain.s, tag);
    seal(to_iv, aad, plain.s, data, tag);
    return;
  }
  const std::size_t piece = scratch.size() & ~(block_size - 1);
  check(piece != 0, "the scratch must hold a block");
  const detail::vector_register_guard clear;
  const impl& src = usable(from.impl_.get(), from, from_iv, aad.size(), tag.size());
  const impl& dst = usable(impl_.get(), *this, to_iv, aad.size(), tag.size());
  const wiped_on_exit plain{scratch.first(piece)};
  byte* const p = bytes(data);
  byte* const buf = bytes(plain.s);
  if (kind() == cipher_kind::aes_256_ctr) {
    alignas(16) byte from_counter[block_size], to_counter[block_size];
    std::copy_n(bytes(from_iv), block_size, from_counter);
    std::copy_n(bytes(to_iv), block_size, to_counter);
    for_each_piece(data.size(), piece, [&](std::size_t at, std::size_t len) {
      src.ctr(std::as_bytes(std::span(from_counter)), data.subspan(at, len), plain.s.first(len));
      dst.ctr(std::as_bytes(std::span(to_counter)), plain.s.first(len), data.subspan(at, len));
      add_to_counter(from_counter, len / block_size);
      add_to_counter(to_counter, len / block_size);
    });
    secure_wipe(from_counter, block_size);
    secure_wipe(to_counter, block_size);
    return;
  }
  if (kind() != cipher_kind::aes_256_gcm) return;  // none: nothing to do
  // GCM authenticates the message whole: one pass checks the old tag (decrypting into
  // the scratch only), and only then a second re-encrypts, piece by piece.
  auto dec = src.gcm_dec.take(*src.gcm_key);
  const auto start = [&](CryptoPP::AuthenticatedSymmetricCipher& gcm, std::span<const std::byte> iv) {
    gcm.Resynchronize(bytes(iv), static_cast<int>(iv.size()));
    gcm.Update(bytes(aad), aad.size());
  };
  start(*dec.mode, from_iv);
  for_each_piece(data.size(), piece, [&](std::size_t at, std::size_t len) { dec->ProcessData(buf, p + at, len); });
  if (!dec->TruncatedVerify(bytes(tag), tag.size()))
    throw integrity_error("memshuffle::cipher: the GCM tag does not match (data, associated data or nonce altered)");
  with_encryptor(dst, [&](detail::secret_gcm<true>& enc) {
    start(*dec.mode, from_iv);
    start(enc, to_iv);
    for_each_piece(data.size(), piece, [&](std::size_t at, std::size_t len) {
      dec->ProcessData(buf, p + at, len);
      enc.ProcessData(p + at, buf, len);
    });
    enc.TruncatedFinal(bytes(tag), tag.size());
  });
}

}  // namespace memshuffle
