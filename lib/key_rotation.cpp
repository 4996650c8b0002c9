// Key rotation: a new key becomes current, and the entries at rest are re-encrypted
// under it in batches whose AES work runs outside the lock (docs/design.md,
// "Encryption at rest"), in a scratch buffer of secret memory.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <new>
#include <vector>

#include <memshuffle/secure_wipe.hpp>

#include "secret_memory.hpp"
#include "shuffler_sync.hpp"

namespace memshuffle {

namespace {
// detail::set_rotation_batch_hook's function and its argument.
constinit std::atomic<void (*)(void*)> batch_hook{nullptr};
constinit std::atomic<void*> batch_hook_context{nullptr};

void run_batch_hook() noexcept {
  if (auto* f = batch_hook.load(std::memory_order_acquire)) f(batch_hook_context.load(std::memory_order_relaxed));
}
}  // namespace

void detail::set_rotation_batch_hook(void (*f)(void*), void* context) noexcept {
  batch_hook_context.store(context, std::memory_order_relaxed);
  batch_hook.store(f, std::memory_order_release);
}

void shuffler::synchronized::rotate(std::unique_lock<std::mutex>& lk, const key_type* key, const salt_type* salt) {
  impl::scratch_buffer scratch(core.scratch_resource());
  std::vector<impl::reseal> batch;
  if (!core.begin_rotation(key, salt, scratch, batch)) return;
  // Encryptions already under way under an older key finish first.
  cv.wait(lk, [&] { return !core.keys.sealing_under_older(); });
  core.keys.drop_all_unused();
  for (std::uint32_t cursor = 0; cursor < core.table.slots();) {
    bool whole = true;
    const impl::key_slot* to = nullptr;  // kept by the batch's sealing count
    transition(
        lk,
        [&] {
          cursor = core.mark_batch(cursor, batch, scratch);  // may throw: all readable still
          if (!batch.empty()) to = &core.keys[batch.front().to_id];
          return batch.empty() ? work_at::nowhere : work_at::outside;
        },
        [&] {
          run_batch_hook();
          // The entries lie all over the heap: each one's bytes are asked for early.
          constexpr std::size_t ahead = 8;
          for (std::size_t k = 0; k < std::min(ahead, batch.size()); ++k) __builtin_prefetch(batch[k].data, 1);
          for (std::size_t k = 0; k < batch.size(); ++k) {
            if (k + ahead < batch.size()) __builtin_prefetch(batch[k + ahead].data, 1);
            core.reencrypt(batch[k], *to, scratch.bytes());
          }
        },
        [&] {
          whole = core.commit_batch(batch, batch.front().to_id);
          batch.clear();
        });
    // Every entry is readable under the key it is under; the caller hears of the rest.
    if (!whole) throw std::bad_alloc();
  }
}

// Always the library's secret memory: no lease of the user's is open, so the user's
// plaintext_resource (which may be ordinary memory) has no say here.
std::pmr::memory_resource* shuffler::impl::scratch_resource() const noexcept {
  return detail::secret_memory();
}

void shuffler::impl::scratch_buffer::reset(std::size_t bytes) {
  if (p_ != nullptr) {
    secure_wipe(p_, n_);
    r_->deallocate(p_, n_, alignof(std::max_align_t));
    p_ = nullptr, n_ = 0;
  }
  if (bytes == 0) return;
  p_ = static_cast<std::byte*>(r_->allocate(bytes, alignof(std::max_align_t)));
  n_ = bytes;
}

bool shuffler::impl::begin_rotation(const key_type* key, const salt_type* salt, scratch_buffer& scratch,
                                    std::vector<reseal>& batch) {
  // Everything that can fail for want of memory comes before the new key: sized for
  // the entries there are now (a larger one created later grows the scratch then).
  // (The counters give the live bytes as stored at once: no walk over the slots.)
  const std::size_t total = counters.live_bytes + counters.live_entries * tag_bytes;
  if (encrypting && total != 0) scratch.reset(std::min(total, rotation_batch_bytes));
  batch.reserve(encrypting ? rotation_batch_entries : 0);
  keys.rotate_to(key, salt);  // the last step that can fail before any change
  ++counters.key_rotations;
  return encrypting;
}

std::uint32_t shuffler::impl::mark_batch(std::uint32_t cursor, std::vector<reseal>& batch, scratch_buffer& scratch) {
  // A rotation during an earlier batch may have moved the current key on.
  const std::uint16_t to = keys.current_id();
  key_slot& k = keys.current();
  std::size_t used = 0;
  for (; cursor < table.slots() && batch.size() < rotation_batch_entries; ++cursor) {
    entry& e = table[cursor];
    if (e.st() != entry_state::at_rest || !e.written || e.key == to) continue;
    // An entry larger than a batch is re-encrypted a batch of it at a time.
    const std::size_t room = std::min(stored_bytes(e), rotation_batch_bytes);
    if (used + room > scratch.bytes().size()) {
      if (!batch.empty()) break;
      if (room > scratch.bytes().size()) scratch.reset(room);
    }
    batch.push_back({cursor, table.handle_of(cursor), &keys[e.key], e.key, to, e.aux, k.next_seq++, e.data, e.size,
                     used, outcome::no_memory});
    e.set(entry_state::sealing);
    used += room;
  }
  k.sealing += batch.size();
  if (full_active()) full.unsettled += batch.size();
  return cursor;
}

// The plaintext of an entry exists only in its part of the scratch (secret memory),
// wiped at once; an entry larger than that part goes piece by piece (cipher::reseal).
void shuffler::impl::reencrypt(reseal& r, const key_slot& k, std::span<std::byte> scratch) const noexcept {
  const auto aad = detail::be64(static_cast<std::uint64_t>(r.h));
  const auto room = scratch.subspan(r.offset, std::min(r.size + tag_bytes, scratch.size() - r.offset));
  try {
    k.c.reseal(r.from->c, detail::iv_for(*r.from, detail::counter_block(*r.from, r.from_seq)),
               detail::iv_for(k, detail::counter_block(k, r.to_seq)), aad_span(aad), {r.data, r.size},
               {r.data + r.size, tag_bytes}, room);
    r.result = outcome::done;
  } catch (const integrity_error&) {
    r.result = outcome::altered;  // left as it is, under its old key
  } catch (...) {
    r.result = outcome::no_memory;  // the cipher's own allocation failed; the entry untouched
  }
}

}  // namespace memshuffle

namespace memshuffle {

bool shuffler::impl::commit_batch(std::span<const reseal> batch, std::uint16_t to) noexcept {
  key_slot& k = keys[to];
  k.sealing -= batch.size();
  bool whole = true;
  for (const reseal& r : batch) {
    entry& e = table[r.index];
    e.set(entry_state::at_rest);
    if (r.result == outcome::done) {
      ++counters.decryptions;
      ++k.encryptions, ++counters.encryptions;
      ++k.users;
      keys.drop_user(r.from_id);
      e.key = to;
      e.aux = r.to_seq;
    } else if (r.result == outcome::altered) {
      ++counters.integrity_failures;
    } else {
      whole = false;
    }
    if (e.free_on_return) doom(r.index);  // sealed<T> ended meanwhile
  }
  keys.drop_if_unused(to);
  return whole;
}

bool shuffler::impl::rotation_due() const noexcept {
  return opt.rotate_key_every != 0 && keys[keys.current_id()].encryptions >= opt.rotate_key_every;
}

}  // namespace memshuffle
