#include "secret_crypto.hpp"

#include <memshuffle/secure_wipe.hpp>

#include "fork_epoch.hpp"

#include <crypto++/cpu.h>

#include <cstring>
#include <stdexcept>

namespace memshuffle::detail {

namespace {

// A SecBlock's storage pointer is a protected member; a pointer to member formed
// through a class derived from the SecBlock reaches it in any SecBlock of that type.
template <class Block>
struct storage_of : Block {
  static auto pointer() { return &storage_of::m_ptr; }
};

template <class Block>
auto& storage(Block& b) {
  return b.*storage_of<Block>::pointer();
}

}  // namespace

void* relocated_block::move_in(void* storage, std::size_t bytes, std::pmr::memory_resource* resource) {
  if (bytes == 0) return storage;
  void* secret = resource->allocate(bytes, 16);
  std::memcpy(secret, storage, bytes);
  secure_wipe(storage, bytes);
  heap_ = storage;
  secret_ = secret;
  bytes_ = bytes;
  resource_ = resource;
  epoch_ = fork_epoch();
  return secret;
}

void* relocated_block::move_out() noexcept {
  if (secret_ == nullptr) return nullptr;
  if (fork_epoch() == epoch_) secure_wipe(secret_, bytes_);
  resource_->deallocate(secret_, bytes_, 16);
  secret_ = nullptr;
  return heap_;
}

secret_aes::~secret_aes() {
  schedule_.restore(storage(m_key));
  secure_wipe(m_aliasBlock.data(), m_aliasBlock.size());
}

// Keying first under an all-zero key sizes Crypto++'s blocks; once they are moved into
// secret memory, keying again writes in place (a SecBlock of the same size keeps its
// storage), so the real key's schedule never passes through the heap.
namespace {
constexpr CryptoPP::byte zero_key[32] = {};
constexpr CryptoPP::byte unused_iv[12] = {};  // Crypto++ insists on an IV when keying GCM

void check_in_place(const void* before, const void* after) {
  if (before != after)
    throw std::logic_error("memshuffle: Crypto++ moved a key block while keying (layout changed?)");
}
}  // namespace

void secret_aes::key(const CryptoPP::byte* key, std::size_t size, std::pmr::memory_resource* resource) {
  SetKey(zero_key, size);
  relocate_schedule(resource);
  const void* block = storage(m_key);
  SetKey(key, size);
  check_in_place(block, storage(m_key));
}

void secret_aes::relocate_schedule(std::pmr::memory_resource* resource) {
  schedule_.relocate(storage(m_key), m_key.SizeInBytes(), resource);
}

void secret_aes::wipe_scratch() noexcept {
  // Crypto++ marks the scratch block as never needing a wipe; without AES-NI its SSE2
  // path copies round keys into it. With AES-NI it is unused.
  if (!CryptoPP::HasAESNI()) secure_wipe(m_aliasBlock.data(), m_aliasBlock.size());
}

template <bool Encrypting>
secret_gcm<Encrypting>::~secret_gcm() {
  tables_.restore(storage(m_buffer));
}

template <bool Encrypting>
void secret_gcm<Encrypting>::key(const CryptoPP::byte* key, std::size_t size,
                                 std::pmr::memory_resource* resource) {
  SetKeyWithIV(zero_key, size, unused_iv, sizeof unused_iv);
  aes_.relocate_schedule(resource);
  tables_.relocate(storage(m_buffer), m_buffer.size(), resource);
  const void* tables = storage(m_buffer);
  SetKeyWithIV(key, size, unused_iv, sizeof unused_iv);  // every call resynchronises anyway
  check_in_place(tables, storage(m_buffer));
}

template <bool Encrypting>
void secret_gcm<Encrypting>::wipe_call_state() noexcept {
  // GCTR's buffers are protected members of its bases, reached the same way.
  struct gctr_access : GCTR {
    static auto iv() { return &gctr_access::m_register; }
    static auto counter() { return &gctr_access::m_counterArray; }
    static auto keystream() { return &gctr_access::m_buffer; }
  };
  auto& iv = m_ctr.*gctr_access::iv();
  auto& counter = m_ctr.*gctr_access::counter();
  auto& keystream = m_ctr.*gctr_access::keystream();
  secure_wipe(iv.data(), iv.size());
  secure_wipe(counter.data(), counter.size());
  secure_wipe(keystream.data(), keystream.size());
  aes_.wipe_scratch();
}

template class secret_gcm<true>;
template class secret_gcm<false>;

}  // namespace memshuffle::detail
