#include "key_ring.hpp"

#include <memshuffle/os_random.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>

#include "secret_memory.hpp"

namespace memshuffle::detail {

namespace {

// A buffer of secret memory that is wiped and given back when it ends.
struct secret_bytes {
  secret_bytes(std::size_t n, std::pmr::memory_resource* r)
      : memory(r), bytes(n), p(static_cast<std::byte*>(r->allocate(n, alignof(std::max_align_t)))) {}
  ~secret_bytes() {
    secure_wipe(p, bytes);
    memory->deallocate(p, bytes, alignof(std::max_align_t));
  }
  secret_bytes(const secret_bytes&) = delete;
  secret_bytes& operator=(const secret_bytes&) = delete;
  std::pmr::memory_resource* memory;
  std::size_t bytes;
  std::byte* p;
};

}  // namespace

key_ring::key_ring(cipher_kind kind)
    : kind_(kind), memory_(kind == cipher_kind::none ? std::pmr::new_delete_resource() : secret_memory()) {}

key_ring::~key_ring() {
  for (key_slot* k : slots_)
    if (k != nullptr) destroy(k);
}

void key_ring::destroy(key_slot* k) noexcept {
  k->~key_slot();
  secure_wipe(k, sizeof(key_slot));
  memory_->deallocate(k, sizeof(key_slot), alignof(key_slot));
}

std::uint16_t key_ring::add(const key_type* key, const salt_type* salt) {
  auto free_slot = std::find(slots_.begin(), slots_.end(), nullptr);
  if (free_slot == slots_.end()) {
    if (slots_.size() >= no_key) throw std::length_error("memshuffle: too many keys in use at once");
    slots_.reserve(slots_.size() + 1);
    free_slot = slots_.end();
  }
  // The raw key and the salt pass through secret memory only.
  secret_bytes raw(sizeof(key_type) + sizeof(salt_type), memory_);
  const std::span key_bytes(raw.p, sizeof(key_type));
  const std::span salt_bytes(raw.p + sizeof(key_type), sizeof(salt_type));
  if (key) std::memcpy(key_bytes.data(), key->data(), key_bytes.size());
  else os_random(key_bytes);
  if (salt) std::memcpy(salt_bytes.data(), salt->data(), salt_bytes.size());
  else os_random(salt_bytes);
  std::uint64_t first_seq = 0;
  os_random(std::as_writable_bytes(std::span(&first_seq, 1)));
  void* place = memory_->allocate(sizeof(key_slot), alignof(key_slot));
  key_slot* k = nullptr;
  try {
    k = ::new (place) key_slot(kind_, key_bytes, *reinterpret_cast<const salt_type*>(salt_bytes.data()), first_seq);
  } catch (...) {
    memory_->deallocate(place, sizeof(key_slot), alignof(key_slot));
    throw;
  }
  if (free_slot == slots_.end()) {
    slots_.push_back(k);  // reserved above: cannot throw
    return static_cast<std::uint16_t>(slots_.size() - 1);
  }
  *free_slot = k;
  return static_cast<std::uint16_t>(free_slot - slots_.begin());
}

void key_ring::rotate_to(const key_type* key, const salt_type* salt) {
  const std::uint16_t previous = current_;
  current_ = add(key, salt);
  if (previous != no_key) drop_if_unused(previous);
}

std::uint64_t key_ring::begin_seal() noexcept {
  key_slot& k = current();
  ++k.users, ++k.sealing;
  return k.next_seq++;
}

void key_ring::drop_user(std::uint16_t id) noexcept {
  --slots_[id]->users;
  drop_if_unused(id);
}

void key_ring::drop_if_unused(std::uint16_t id) noexcept {
  key_slot*& k = slots_[id];
  if (k == nullptr || k->users != 0 || k->sealing != 0 || id == current_) return;
  destroy(k);
  k = nullptr;
}

void key_ring::drop_all_unused() noexcept {
  for (std::size_t id = 0; id < slots_.size(); ++id) drop_if_unused(static_cast<std::uint16_t>(id));
}

bool key_ring::sealing_under_older() const noexcept {
  for (std::size_t id = 0; id < slots_.size(); ++id)
    if (slots_[id] != nullptr && id != current_ && slots_[id]->sealing != 0) return true;
  return false;
}

void derive_shard_key(const key_type& key, const salt_type& salt, std::uint16_t shard, key_type& out_key,
                      salt_type& out_salt) {
  const cipher prf(cipher_kind::aes_256_ctr, key);  // its schedule in secret memory
  std::array<std::byte, 16> block{};
  std::copy(salt.begin(), salt.end(), block.begin());
  for (int i = 8; i < 12; ++i) block[i] = std::byte{0xFF};
  block[12] = static_cast<std::byte>(shard >> 8);
  block[13] = static_cast<std::byte>(shard);
  std::fill(out_key.begin(), out_key.end(), std::byte{0});
  prf.seal(block, {}, out_key, {});  // blocks j = 0 and 1
  block[15] = std::byte{2};
  std::fill(out_salt.begin(), out_salt.end(), std::byte{0});
  prf.seal(block, {}, out_salt, {});
}

}  // namespace memshuffle::detail
