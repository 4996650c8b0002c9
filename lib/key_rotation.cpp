// Key rotation: a new key becomes current, and the entries at rest are re-encrypted
// under it in batches whose AES work runs outside the lock (docs/design.md,
// "Encryption at rest").
#include <algorithm>
#include <cstring>
#include <new>
#include <vector>

#include "shuffler_impl.hpp"

namespace memshuffle {

void shuffler::impl::rotate(const key_type* key, const salt_type* salt, std::unique_lock<std::mutex>& lk) {
  // Everything that can fail for want of memory comes before the new key: sized for
  // the entries there are now (a larger one created later grows the scratch then).
  std::size_t largest = 0, total = 0;
  for (std::uint32_t i = 0; i < table.slots(); ++i)
    if (table[i].live()) largest = std::max(largest, stored_bytes(table[i])), total += stored_bytes(table[i]);
  CryptoPP::SecByteBlock scratch(encrypting ? std::max(largest, std::min(total, rotation_batch_bytes)) : 0);
  std::vector<reseal> batch;
  batch.reserve(encrypting ? rotation_batch_entries : 0);
  const std::uint16_t previous = current_key;
  current_key = add_key(key, salt);  // the last step that can fail before any change
  ++key_rotations;
  drop_if_unused(previous);
  if (!encrypting) return;
  // Encryptions already under way under an older key finish first.
  cv.wait(lk, [&] {
    for (std::size_t k = 0; k < keys.size(); ++k)
      if (keys[k] && k != current_key && keys[k]->sealing != 0) return false;
    return true;
  });
  for (std::size_t k = 0; k < keys.size(); ++k)
    if (keys[k]) drop_if_unused(static_cast<std::uint16_t>(k));
  for (std::uint32_t cursor = 0; cursor < table.slots();) {
    // A rotation during an earlier batch may have moved the current key on.
    const std::uint16_t to = current_key;
    cursor = mark_batch(cursor, to, batch, scratch);  // may throw: all readable still
    if (batch.empty()) break;
    key_slot& k = *keys[to];
    k.sealing += batch.size();
    lk.unlock();
    const std::span scratch_bytes(reinterpret_cast<std::byte*>(scratch.data()), scratch.size());
    for (reseal& r : batch) reencrypt(r, k, scratch_bytes);
    lk.lock();
    const bool whole = commit_batch(batch, to);
    batch.clear();
    cv.notify_all();
    // Every entry is readable under the key it is under; the caller hears of the rest.
    if (!whole) throw std::bad_alloc();
  }
}

std::uint32_t shuffler::impl::mark_batch(std::uint32_t cursor, std::uint16_t to, std::vector<reseal>& batch,
                         CryptoPP::SecByteBlock& scratch) {
  key_slot& k = *keys[to];
  std::size_t used = 0;
  for (; cursor < table.slots() && batch.size() < rotation_batch_entries; ++cursor) {
    entry& e = table[cursor];
    if (e.st() != entry_state::at_rest || !e.written || e.key == to) continue;
    const std::size_t n = stored_bytes(e);
    if (used + n > scratch.size()) {
      if (!batch.empty()) break;
      scratch.CleanNew(n);
    }
    batch.push_back({cursor, table.handle_of(cursor), keys[e.key].get(), e.key, e.aux, k.next_seq++, e.data, e.size, used,
                     reseal::outcome::no_memory});
    e.set(entry_state::sealing);
    used += n;
  }
  return cursor;
}

void shuffler::impl::reencrypt(reseal& r, const key_slot& k, std::span<std::byte> scratch) const noexcept {
  const std::size_t n = r.size + tag_bytes;
  std::byte* buf = scratch.data() + r.offset;
  std::memcpy(buf, r.data, n);
  const auto aad = detail::be64(static_cast<std::uint64_t>(r.h));
  try {
    r.from->c.open(detail::iv_for(*r.from, detail::counter_block(*r.from, r.from_seq)), aad_span(aad), {buf, r.size},
                   {buf + r.size, tag_bytes});
    k.c.seal(detail::iv_for(k, detail::counter_block(k, r.to_seq)), aad_span(aad), {buf, r.size}, {buf + r.size, tag_bytes});
  } catch (const integrity_error&) {
    r.result = reseal::outcome::altered;  // left as it is, under its old key
    return;
  } catch (...) {
    r.result = reseal::outcome::no_memory;  // the cipher's own allocation failed
    return;
  }
  std::memcpy(r.data, buf, n);
  r.result = reseal::outcome::done;
}

bool shuffler::impl::commit_batch(std::span<const reseal> batch, std::uint16_t to) noexcept {
  key_slot& k = *keys[to];
  k.sealing -= batch.size();
  bool whole = true;
  for (const reseal& r : batch) {
    entry& e = table[r.index];
    e.set(entry_state::at_rest);
    if (r.result == reseal::outcome::done) {
      ++decryptions;
      ++k.encryptions, ++encryptions;
      ++k.users;
      drop_user(r.from_id);
      e.key = to;
      e.aux = r.to_seq;
    } else if (r.result == reseal::outcome::altered) {
      ++integrity_failures;
    } else {
      whole = false;
    }
    if (e.free_on_return) doom(r.index);  // sealed<T> ended meanwhile
  }
  drop_if_unused(to);
  return whole;
}

void shuffler::impl::maybe_rotate(std::unique_lock<std::mutex>& lk) noexcept {
  if (opt.rotate_key_every == 0 || keys[current_key]->encryptions < opt.rotate_key_every) return;
  try {
    rotate(nullptr, nullptr, lk);
  } catch (...) {
    // Tried again after the next encryption.
  }
}

}  // namespace memshuffle
