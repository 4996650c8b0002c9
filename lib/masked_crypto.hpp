#pragma once
// Crypto++'s AES and GCM objects with their key material masked at rest: between calls
// the expanded AES key and GCM's hash key tables are XORed with random pads that live
// in secret memory, so the heap copies Crypto++ keeps are useless without the pads
// (docs/security.md, "The cipher's custody").
#include <crypto++/aes.h>
#include <crypto++/gcm.h>

#include <cstddef>
#include <span>

namespace memshuffle::detail {

// Pad sizes, fixed so that the pads can be laid out before any object is keyed. An
// AES-256 schedule is 240 bytes (256 in Crypto++'s ARMv7 layout); GCM's buffer is three
// blocks and its multiplication table (128 bytes with CLMUL/PMULL, else 2 KiB), of
// which the first two blocks are per-call state that is wiped rather than masked.
inline constexpr std::size_t schedule_pad_size = 256;
inline constexpr std::size_t gcm_state_bytes = 2 * 16;
inline constexpr std::size_t table_pad_size = 16 + 2048;

/// \effects XORs `pad` into `target`: target[i] ^= pad[i] for every i.
/// \requires target.size() <= pad.size().
void xor_pad(std::span<std::byte> target, std::span<const std::byte> pad) noexcept;

// AES encryption whose round keys can be masked.
class masked_aes final : public CryptoPP::AES::Encryption {
 public:
  masked_aes() = default;
  masked_aes(const masked_aes&) = delete;
  masked_aes& operator=(const masked_aes&) = delete;
  /// \effects Wipes the scratch block too, which Crypto++ itself frees unwiped.
  ~masked_aes() override;

  /// \returns The expanded key as bytes (empty before SetKey).
  std::span<std::byte> schedule() noexcept;
  /// \effects XORs the schedule with `pad`: masks an unmasked schedule and unmasks a
  ///          masked one. Wipes the table-driven path's scratch block (which then held
  ///          round keys) too.
  /// \requires schedule().size() <= pad.size(); no call uses the object meanwhile.
  void toggle_mask(std::span<const std::byte> pad) noexcept;
};

// GCM over masked_aes (Crypto++'s GCM_Final with a block cipher of ours). Its
// buffer holds the hash key H = AES_K(0) and the tables derived from it.
template <bool Encrypting>
class masked_gcm final : public CryptoPP::GCM_Base {
 public:
  masked_gcm() = default;
  masked_gcm(const masked_gcm&) = delete;
  masked_gcm& operator=(const masked_gcm&) = delete;
  ~masked_gcm() override;

  bool IsForwardTransformation() const override { return Encrypting; }

  /// \effects Zeroes what a call leaves behind: GCTR's keystream buffer (which holds
  ///          AES_K(J0), the tag's mask), its counters and the running hash state.
  ///          Every call resynchronises them anyway.
  void wipe_call_state() noexcept;
  /// \effects XORs the AES schedule with `schedule_pad` and the hash key tables with
  ///          `table_pad` (masks or unmasks, as masked_aes::toggle_mask).
  /// \requires the object is keyed and no call uses it meanwhile; call
  ///           wipe_call_state() before masking.
  void toggle_mask(std::span<const std::byte> schedule_pad,
                   std::span<const std::byte> table_pad) noexcept;
  /// \returns The bytes of hash key and tables that toggle_mask() XORs.
  std::size_t table_bytes() const noexcept;
  /// \returns The bytes of AES schedule that toggle_mask() XORs.
  std::size_t schedule_bytes() noexcept { return aes_.schedule().size(); }

 private:
  CryptoPP::GCM_TablesOption GetTablesOption() const override { return CryptoPP::GCM_2K_Tables; }
  CryptoPP::BlockCipher& AccessBlockCipher() override { return aes_; }

  masked_aes aes_;
};

extern template class masked_gcm<true>;
extern template class masked_gcm<false>;

}  // namespace memshuffle::detail
