#pragma once
// Crypto++'s AES and GCM objects whose key material lives in secret memory. Crypto++
// keeps the expanded AES key (Rijndael::Base::m_key) and GCM's hash key H with its
// tables (GCM_Base::m_buffer) in heap SecBlocks; once an object is keyed, those blocks
// are copied into secret memory and the SecBlocks are pointed there, so every later
// call reads them from secret memory and the heap holds only wiped bytes
// (docs/security.md, "The cipher's custody").
#include <crypto++/aes.h>
#include <crypto++/gcm.h>

#include <cstddef>
#include <cstdint>
#include <memory_resource>

namespace memshuffle::detail {

// One SecBlock's storage moved into secret memory, and moved back (the wiped heap
// storage, which Crypto++ then frees itself) when the owner ends.
class relocated_block {
 public:
  relocated_block() = default;
  relocated_block(const relocated_block&) = delete;
  relocated_block& operator=(const relocated_block&) = delete;
  ~relocated_block() = default;

  /// \effects Copies the `bytes` at `*storage` into memory from `resource`, wipes the
  ///          heap copy and points `*storage` at the new copy.
  /// \throws What resource->allocate throws; nothing changes then.
  /// \requires Nothing was relocated yet; *storage is 16-byte aligned.
  template <class T>
  void relocate(T*& storage, std::size_t bytes, std::pmr::memory_resource* resource) {
    storage = static_cast<T*>(move_in(storage, bytes, resource));
  }
  /// \effects Points `*storage` back at its wiped heap storage and gives the secret
  ///          copy back to its resource, wiped first unless this is a fork child of
  ///          the process that relocated it (there it is neither read nor written).
  template <class T>
  void restore(T*& storage) noexcept {
    if (void* heap = move_out()) storage = static_cast<T*>(heap);
  }

 private:
  // The new storage; the heap storage to point back at (null when none was moved).
  void* move_in(void* storage, std::size_t bytes, std::pmr::memory_resource* resource);
  void* move_out() noexcept;

  void* heap_ = nullptr;
  void* secret_ = nullptr;
  std::size_t bytes_ = 0;
  std::pmr::memory_resource* resource_ = nullptr;
  std::uint64_t epoch_ = 0;
};

// AES encryption whose round keys live in secret memory once keyed with key().
class secret_aes final : public CryptoPP::AES::Encryption {
 public:
  secret_aes() = default;
  secret_aes(const secret_aes&) = delete;
  secret_aes& operator=(const secret_aes&) = delete;
  /// \effects Gives the schedule's secret memory back (see relocated_block::restore)
  ///          and wipes the table-driven path's scratch block, which Crypto++ itself
  ///          frees unwiped.
  ~secret_aes() override;

  /// \effects Keys the object and moves the expanded key into memory from `resource`.
  /// \throws What SetKey or resource->allocate throw.
  /// \requires Called at most once.
  void key(const CryptoPP::byte* key, std::size_t size, std::pmr::memory_resource* resource);
  /// \effects Moves the expanded key of an object keyed by the caller (key() does this).
  void relocate_schedule(std::pmr::memory_resource* resource);
  /// \effects Wipes the scratch block that the table-driven AES (no AES-NI) fills with
  ///          round keys during a call; nothing to do with AES-NI.
  /// \requires No call uses the object meanwhile.
  void wipe_scratch() noexcept;

 private:
  relocated_block schedule_;
};

// GCM over secret_aes (Crypto++'s GCM_Final with a block cipher of ours).
template <bool Encrypting>
class secret_gcm final : public CryptoPP::GCM_Base {
 public:
  secret_gcm() = default;
  secret_gcm(const secret_gcm&) = delete;
  secret_gcm& operator=(const secret_gcm&) = delete;
  /// \effects Gives the secret memory back (see relocated_block::restore).
  ~secret_gcm() override;

  bool IsForwardTransformation() const override { return Encrypting; }

  /// \effects Keys the object and moves the AES schedule, H and its tables into memory
  ///          from `resource`.
  /// \throws What SetKeyWithIV or resource->allocate throw.
  /// \requires Called at most once.
  void key(const CryptoPP::byte* key, std::size_t size, std::pmr::memory_resource* resource);
  /// \effects Zeroes what a call leaves in the heap: GCTR's keystream buffer (which
  ///          holds AES_K(J0), the tag's mask), its counter and IV copies, and the AES
  ///          scratch block. Every call resynchronises them anyway.
  void wipe_call_state() noexcept;

 private:
  CryptoPP::GCM_TablesOption GetTablesOption() const override { return CryptoPP::GCM_2K_Tables; }
  CryptoPP::BlockCipher& AccessBlockCipher() override { return aes_; }

  secret_aes aes_;
  relocated_block tables_;
};

extern template class secret_gcm<true>;
extern template class secret_gcm<false>;

}  // namespace memshuffle::detail
