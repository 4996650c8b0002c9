// The shuffler proper: its keys, entries and policies, rent and return, and the
// public members; the state and the lock are described in shuffler_impl.hpp.
#include <memshuffle/shuffler.hpp>
#include <memshuffle/os_random.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "shuffler_impl.hpp"

namespace memshuffle {

namespace {

using detail::entry;
using detail::entry_state;
using detail::no_key;
using detail::be64;
using detail::counter_block;
using detail::iv_for;

std::uint64_t random_u64() {
  std::uint64_t v = 0;
  os_random(std::as_writable_bytes(std::span(&v, 1)));
  return v;
}

// A nonzero 16-bit tag per shuffler, so its handles are told apart from another's.
std::uint16_t next_tag() {
  static std::atomic<std::uint32_t> counter{static_cast<std::uint32_t>(random_u64())};
  for (;;) {
    const auto tag = static_cast<std::uint16_t>(counter.fetch_add(1, std::memory_order_relaxed));
    if (tag != 0) return tag;
  }
}

// One GCM message: its 32-bit block counter covers 2^32 - 2 blocks of plaintext
// (NIST SP 800-38D: at most 2^39 - 256 bits).
constexpr std::size_t gcm_max_entry = (std::size_t{1} << 36) - 32;

}  // namespace

shuffler::impl::impl(const shuffler_options& o, std::pmr::memory_resource* up)
    : opt(o),
      upstream(up),
      encrypting(o.cipher != cipher_kind::none),
      tag_bytes(o.cipher == cipher_kind::aes_256_gcm ? cipher::gcm_tag_size : 0),
      on_return(o.shuffle_on_borrow_return),
      table(next_tag()),
      heap(up, o.arena_size),
      rng(random_u64()) {
  current_key = add_key(o.key ? &*o.key : nullptr, o.salt ? &*o.salt : nullptr);
  if (opt.key) secure_wipe(opt.key->data(), opt.key->size());
  opt.key.reset();
}

shuffler::impl::~impl() {
  // Leases still open at this point are a caller's bug; their windows are wiped anyway.
  for (std::uint32_t i = 0; i < table.slots(); ++i) {
    const entry& e = table[i];
    if (e.st() == entry_state::open) drop_window(e);
  }
}

std::uint16_t shuffler::impl::add_key(const key_type* key, const salt_type* salt) {
  CryptoPP::SecByteBlock k(cipher::key_size), s(sizeof(salt_type));
  if (key) std::memcpy(k.data(), key->data(), k.size());
  else os_random(std::as_writable_bytes(std::span(k.data(), k.size())));
  if (salt) std::memcpy(s.data(), salt->data(), s.size());
  else os_random(std::as_writable_bytes(std::span(s.data(), s.size())));
  auto slot = std::make_unique<key_slot>(opt.cipher, k, s, random_u64());
  auto free_slot = std::find(keys.begin(), keys.end(), nullptr);
  if (free_slot != keys.end()) {
    *free_slot = std::move(slot);
    return static_cast<std::uint16_t>(free_slot - keys.begin());
  }
  if (keys.size() >= no_key) throw std::length_error("memshuffle: too many keys in use at once");
  keys.push_back(std::move(slot));
  return static_cast<std::uint16_t>(keys.size() - 1);
}

void shuffler::impl::drop_user(std::uint16_t id) noexcept {
  --keys[id]->users;
  drop_if_unused(id);
}

void shuffler::impl::drop_if_unused(std::uint16_t id) noexcept {
  const key_slot& k = *keys[id];
  if (k.users == 0 && k.sealing == 0 && id != current_key) keys[id].reset();
}

entry& shuffler::impl::find_live(handle h) {
  entry* e = table.find(h);
  if (e == nullptr || e->free_on_return)
    throw invalid_handle_error("memshuffle: invalid, stale, freed or foreign handle");
  return *e;
}

void shuffler::impl::drop_window(const entry& e) noexcept {
  if (opt.plaintext_resource == nullptr) return;
  std::byte* w = plaintext_of(e);
  if (w == nullptr) return;
  secure_wipe(w, e.size);
  opt.plaintext_resource->deallocate(w, e.size, e.alignment());
}

void shuffler::impl::doom(std::uint32_t i) noexcept {
  entry& e = table[i];
  if (e.written && e.key != no_key) drop_user(e.key);
  e.key = no_key;
  e.pins = 0;
  e.free_on_return = 0;
  e.set(entry_state::doomed);
  table.invalidate(i);
  --live_entries;
  live_bytes -= e.size;
  ++pending_free;
}

void shuffler::impl::doom_open(std::uint32_t i) noexcept {
  entry& e = table[i];
  if (opt.plaintext_resource != nullptr) drop_window(e);
  else secure_wipe(e.data, e.size);
  doom(i);
}

void shuffler::impl::count_op() noexcept {
  ++ops;
  if (opt.shuffle_every != 0 && ops % opt.shuffle_every == 0) try_shuffle();
}

void shuffler::impl::check_ratio() noexcept {
  // Live bytes as stored, GCM tags included: no layout can hold less than that.
  const std::size_t stored = live_bytes + live_entries * tag_bytes;
  const double reserved = static_cast<double>(heap.reserved_bytes());
  // Slack of an arena or two (the one being filled, the ends of full ones) is what any
  // layout has; a shuffle could not remove it, so it never triggers one.
  if (opt.shuffle_above_ratio > 0 && reserved > opt.shuffle_above_ratio * static_cast<double>(stored) &&
      heap.reserved_bytes() > stored + 2 * heap.arena_size()) {
    try {
      compact();
    } catch (...) {
      // Each step is whole: without memory the compaction stops where it got to.
    }
  }
}

void shuffler::impl::try_shuffle() noexcept {
  try {
    compact();
  } catch (...) {
    // Automatic: without memory the compaction stops after its last whole window.
  }
}

shuffler::rented shuffler::impl::rent(handle h, std::size_t size, std::size_t alignment) {
  std::unique_lock lk(m);
  std::uint32_t i = 0;
  for (;;) {
    entry& e = find_live(h);
    if (size > e.size)
      throw type_error("memshuffle: rented type is larger than the entry (" + std::to_string(size) +
                       " > " + std::to_string(e.size) + " bytes)");
    if (alignment > e.alignment())
      throw type_error("memshuffle: entry aligned to " + std::to_string(e.alignment()) +
                       " cannot hold a type aligned to " + std::to_string(alignment));
    if (e.st() == entry_state::open) {
      if (e.pins == std::numeric_limits<std::uint16_t>::max())
        throw lease_error("memshuffle: too many leases open on one entry");
      if (e.pins++ == 0) ++pinned;
      const rented r{plaintext_of(e), e.size};
      count_op();
      return r;
    }
    if (e.st() == entry_state::at_rest) {
      i = table.index_of(h);
      break;
    }
    cv.wait(lk);  // opening or sealing: wait for it, then look again
  }

  entry& e = table[i];
  if (!needs_work()) {
    e.pins = 1;
    e.set(entry_state::open);
    ++pinned;
    const rented r{e.data, e.size};
    count_op();
    return r;
  }

  std::byte* window = nullptr;
  if (opt.plaintext_resource != nullptr)
    window = static_cast<std::byte*>(opt.plaintext_resource->allocate(e.size, e.alignment()));
  e.pins = 1;
  e.set(entry_state::opening);
  ++pinned;
  std::byte* const data = e.data;
  const std::size_t n = e.size, align = e.alignment();
  const std::uint64_t seq = e.aux;
  const bool written = e.written;
  const key_slot* k = written && encrypting ? keys[e.key].get() : nullptr;
  lk.unlock();

  std::byte* const target = window != nullptr ? window : data;
  // A failed open leaves the entry at rest, exactly as it was.
  const auto undo = [&](bool altered) {
    if (window != nullptr) secure_wipe(window, n);
    lk.lock();
    if (window != nullptr) opt.plaintext_resource->deallocate(window, n, align);
    entry& back = table[i];
    back.pins = 0;
    back.set(entry_state::at_rest);
    --pinned;
    if (altered) ++integrity_failures;
    lk.unlock();
    cv.notify_all();
  };
  try {
    if (!written) {
      std::memset(target, 0, n);
    } else {
      if (window != nullptr) std::memcpy(window, data, n);
      if (k != nullptr) {
        const auto aad = be64(static_cast<std::uint64_t>(h));
        k->c.open(iv_for(*k, counter_block(*k, seq)), aad_span(aad), {target, n}, {data + n, tag_bytes});
      }
    }
  } catch (const integrity_error&) {
    undo(true);
    throw;
  } catch (...) {
    undo(false);
    throw;
  }

  lk.lock();
  entry& done = table[i];
  done.set(entry_state::open);
  if (window != nullptr) done.aux = reinterpret_cast<std::uintptr_t>(window);
  if (k != nullptr) ++decryptions;
  count_op();
  lk.unlock();
  cv.notify_all();
  return {target, n};
}

void shuffler::impl::give_back(handle h) {
  std::unique_lock lk(m);
  entry* found = table.find(h);  // an entry sealed<T> gave up while rented still counts
  if (found == nullptr) throw invalid_handle_error("memshuffle: return of an invalid, stale or foreign handle");
  if (found->st() != entry_state::open || found->pins == 0)
    throw lease_error("memshuffle: return without a rent");
  const std::uint32_t i = table.index_of(h);
  if (--found->pins != 0) {
    count_op();
    return;
  }
  --pinned;
  if (found->free_on_return) {
    doom_open(i);
    return;
  }
  if (!needs_work()) {
    found->set(entry_state::at_rest);
    if (on_return) relocate(i);
    count_op();
    return;
  }

  // Encrypt outside the lock, under the current key, with a counter value never used.
  const std::uint16_t kid = current_key;
  key_slot& k = *keys[kid];
  const std::uint64_t seq = k.next_seq++;
  ++k.users, ++k.sealing;
  found->set(entry_state::sealing);
  std::byte* const data = found->data;
  std::byte* const window = opt.plaintext_resource != nullptr ? plaintext_of(*found) : nullptr;
  const std::size_t n = found->size;
  lk.unlock();

  std::byte* const target = window != nullptr ? window : data;
  bool sealed_ok = true;
  try {
    const auto aad = be64(static_cast<std::uint64_t>(h));
    k.c.seal(iv_for(k, counter_block(k, seq)), aad_span(aad), {target, n}, {data + n, tag_bytes});
  } catch (...) {
    sealed_ok = false;  // the cipher could not get memory: stays open, sealed on its next return
  }
  if (sealed_ok && window != nullptr) std::memcpy(data, window, n);

  lk.lock();
  entry& e = table[i];
  --k.sealing;
  if (!sealed_ok) {
    e.set(entry_state::open);
    drop_user(kid);
    lk.unlock();
    cv.notify_all();
    throw std::bad_alloc();
  }
  drop_window(e);
  if (e.written && e.key != no_key) drop_user(e.key);
  e.key = kid;
  e.aux = seq;
  e.written = 1;
  e.set(entry_state::at_rest);
  ++k.encryptions, ++encryptions;
  if (e.free_on_return) {
    doom(i);
  } else if (on_return) {
    relocate(i);
  }
  count_op();
  maybe_rotate(lk);
  lk.unlock();
  cv.notify_all();
}

// --- the public members ---------------------------------------------------------------

shuffler::shuffler(shuffler_options options, std::pmr::memory_resource* upstream) {
  struct wipe_key {
    shuffler_options& o;
    ~wipe_key() {
      if (o.key) secure_wipe(o.key->data(), o.key->size());
    }
  } wipe{options};
  if (upstream == nullptr) throw std::invalid_argument("memshuffle::shuffler: null upstream resource");
  if (options.arena_size == 0) throw std::invalid_argument("memshuffle::shuffler: arena_size is 0");
  if (!(options.shuffle_above_ratio >= 0) || std::isinf(options.shuffle_above_ratio))
    throw std::invalid_argument("memshuffle::shuffler: shuffle_above_ratio must be finite and >= 0");
  if (options.cipher != cipher_kind::none && options.cipher != cipher_kind::aes_256_ctr &&
      options.cipher != cipher_kind::aes_256_gcm)
    throw std::invalid_argument("memshuffle::shuffler: unknown cipher_kind");
  impl_ = std::make_unique<impl>(options, upstream);
}

shuffler::~shuffler() = default;

handle shuffler::alloc_bytes(std::size_t bytes, std::size_t alignment) {
  auto& s = *impl_;
  if (bytes > detail::handle_table::max_entry_size)
    throw type_error("memshuffle: entry of " + std::to_string(bytes) + " bytes is too large");
  // Refused now: sealing it would fail only when its first lease ends, which cannot
  // throw, and the entry would stay plaintext.
  if (s.tag_bytes != 0 && bytes > gcm_max_entry)
    throw type_error("memshuffle: entry of " + std::to_string(bytes) +
                     " bytes is larger than one AES-GCM message can be (2^36 - 32 bytes)");
  std::lock_guard lk(s.m);
  s.table.reserve_one();
  std::byte* p = s.heap.place(bytes + s.tag_bytes, alignment);  // nothing changed if it throws
  const std::uint32_t i = s.table.acquire();
  entry& e = s.table[i];
  e.data = p;
  e.size = bytes;
  e.align_log2 = static_cast<std::uint64_t>(std::countr_zero(alignment));
  e.set(entry_state::at_rest);
  if (!s.encrypting) {
    std::memset(p, 0, bytes);  // nothing to decrypt later: zero it now
    e.written = 1;
  }
  ++s.live_entries;
  s.live_bytes += bytes;
  const handle h = s.table.handle_of(i);
  s.count_op();
  s.check_ratio();
  return h;
}

void shuffler::free(handle h) {
  auto& s = *impl_;
  std::unique_lock lk(s.m);
  for (;;) {
    entry& e = s.find_live(h);
    if (e.st() == entry_state::sealing) {  // its last lease is ending: wait for that
      s.cv.wait(lk);
      continue;
    }
    if (e.pins != 0) throw lease_error("memshuffle: free of a rented entry");
    if (e.st() == entry_state::open) s.doom_open(s.table.index_of(h));
    else s.doom(s.table.index_of(h));
    s.count_op();
    return;
  }
}

shuffler::rented shuffler::rent_bytes(handle h, std::size_t size, std::size_t alignment) {
  return impl_->rent(h, size, alignment);
}

void shuffler::return_pointer(handle h) { impl_->give_back(h); }

void detail::end_lease(shuffler& owner, handle h) noexcept {
  try {
    owner.impl_->give_back(h);
  } catch (...) {
    // A lease always names a rented entry; the only failure is the cipher running out of
    // memory, and then the entry stays open until its next return.
  }
}

void detail::free_when_returned(shuffler& owner, handle h) noexcept {
  auto& s = *owner.impl_;
  std::lock_guard lk(s.m);
  entry* e = s.table.find(h);
  if (e == nullptr || e->free_on_return) return;
  const std::uint32_t i = s.table.index_of(h);
  if (e->pins != 0 || e->st() == entry_state::opening || e->st() == entry_state::sealing) {
    e->free_on_return = 1;  // invalid for users now; freed when its last lease ends
  } else if (e->st() == entry_state::open) {
    s.doom_open(i);
  } else {
    s.doom(i);
  }
}

void shuffler::read(handle h, std::span<std::byte> out) {
  if (out.empty()) {
    (void)size_of(h);
    return;
  }
  const rented r = rent_bytes(h, out.size(), 1);
  std::memcpy(out.data(), r.p, out.size());
  detail::end_lease(*this, h);
}

void shuffler::write(handle h, std::span<const std::byte> in) {
  if (in.empty()) {
    (void)size_of(h);
    return;
  }
  const rented r = rent_bytes(h, in.size(), 1);
  std::memcpy(r.p, in.data(), in.size());
  detail::end_lease(*this, h);
}

bool shuffler::valid(handle h) const noexcept {
  std::lock_guard lk(impl_->m);
  const entry* e = impl_->table.find(h);
  return e != nullptr && !e->free_on_return;
}

std::size_t shuffler::size_of(handle h) const {
  std::lock_guard lk(impl_->m);
  return impl_->find_live(h).size;
}

void shuffler::shuffle() {
  std::lock_guard lk(impl_->m);
  impl_->shuffle_all();
}

void shuffler::shuffle(std::size_t budget) {
  std::lock_guard lk(impl_->m);
  impl_->shuffle_step(budget);
}

void shuffler::set_shuffle_on_borrow_return(bool on) {
  std::lock_guard lk(impl_->m);
  impl_->on_return = on;
}

void shuffler::rotate_key() {
  std::unique_lock lk(impl_->m);
  impl_->rotate(nullptr, nullptr, lk);
}

void shuffler::rotate_key(const key_type& key, const salt_type& salt) {
  std::unique_lock lk(impl_->m);
  impl_->rotate(&key, &salt, lk);
}

shuffler_stats shuffler::stats() const {
  const auto& s = *impl_;
  std::lock_guard lk(s.m);
  shuffler_stats st;
  st.live_entries = s.live_entries;
  st.live_bytes = s.live_bytes;
  st.reserved_bytes = s.heap.reserved_bytes();
  st.arenas = s.heap.arenas();
  st.metadata_bytes = s.table.metadata_bytes();
  st.shuffles = s.shuffles;
  st.bytes_moved = s.bytes_moved;
  st.arenas_released = s.heap.arenas_released();
  st.encryptions = s.encryptions;
  st.decryptions = s.decryptions;
  st.key_rotations = s.key_rotations;
  st.shuffle_time = s.shuffle_time;
  st.pinned_entries = s.pinned;
  st.pending_free_entries = s.pending_free;
  st.integrity_failures = s.integrity_failures;
  st.entries_relocated_on_return = s.relocated_on_return;
  return st;
}

}  // namespace memshuffle
