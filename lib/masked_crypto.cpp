#include "masked_crypto.hpp"

#include <memshuffle/secure_wipe.hpp>

#include <algorithm>

namespace memshuffle::detail {

namespace {

template <class Block>
std::span<std::byte> as_span(Block& b) noexcept {
  return {reinterpret_cast<std::byte*>(b.data()), b.size()};
}

}  // namespace

void xor_pad(std::span<std::byte> target, std::span<const std::byte> pad) noexcept {
  for (std::size_t i = 0; i < target.size(); ++i) target[i] ^= pad[i];
}

masked_aes::~masked_aes() { secure_wipe(m_aliasBlock.data(), m_aliasBlock.size()); }

std::span<std::byte> masked_aes::schedule() noexcept {
  return {reinterpret_cast<std::byte*>(m_key.data()), m_key.SizeInBytes()};
}

void masked_aes::toggle_mask(std::span<const std::byte> pad) noexcept {
  xor_pad(schedule(), pad);
  // Crypto++ marks the scratch block as never needing a wipe; without AES-NI its SSE2
  // path copies round keys into it.
  secure_wipe(m_aliasBlock.data(), m_aliasBlock.size());
}

template <bool Encrypting>
masked_gcm<Encrypting>::~masked_gcm() = default;

template <bool Encrypting>
void masked_gcm<Encrypting>::wipe_call_state() noexcept {
  // GCTR's buffers are protected members of its bases; a pointer to member formed
  // through a class derived from GCTR reaches them in m_ctr.
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
  secure_wipe(m_buffer.data(), std::min(m_buffer.size(), gcm_state_bytes));
}

template <bool Encrypting>
std::size_t masked_gcm<Encrypting>::table_bytes() const noexcept {
  return m_buffer.size() > gcm_state_bytes ? m_buffer.size() - gcm_state_bytes : 0;
}

template <bool Encrypting>
void masked_gcm<Encrypting>::toggle_mask(std::span<const std::byte> schedule_pad,
                                         std::span<const std::byte> table_pad) noexcept {
  aes_.toggle_mask(schedule_pad);
  if (table_bytes() != 0) xor_pad(as_span(m_buffer).subspan(gcm_state_bytes), table_pad);
}

template class masked_gcm<true>;
template class masked_gcm<false>;

}  // namespace memshuffle::detail
