// The shuffler's algorithm: its entries, policies and statistics, and the steps of rent
// and return (shuffler_impl.hpp). Runs under the caller's lock, except *_outside.
#include "shuffler_impl.hpp"

#include <memshuffle/os_random.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <utility>

#include "secret_memory.hpp"

namespace memshuffle {

namespace {

using detail::be64;
using detail::counter_block;
using detail::entry;
using detail::entry_state;
using detail::iv_for;
using detail::no_key;

std::uint64_t random_u64() {
  std::uint64_t v = 0;
  os_random(std::as_writable_bytes(std::span(&v, 1)));
  return v;
}

std::pmr::memory_resource* window_resource_of(const shuffler_options& o) noexcept {
  if (o.plaintext_in_place) return nullptr;
  return o.plaintext_resource != nullptr ? o.plaintext_resource : detail::secret_memory();
}

}  // namespace

shuffler::impl::impl(const shuffler_options& o, const key_type* key, const salt_type* salt,
                     std::pmr::memory_resource* up)
    : opt(o),
      upstream(up),
      window_resource(window_resource_of(o)),
      keep_spare(window_resource == detail::secret_memory()),
      encrypting(o.cipher != cipher_kind::none),
      tag_bytes(o.cipher == cipher_kind::aes_256_gcm ? cipher::gcm_tag_size : 0),
      on_return(o.shuffle_on_return),
      table(tag.grant.tag, tag.grant.first_generation, &detail::huge_page_resource::instance()),
      heap(up, o.arena_size),
      keys(o.cipher),
      rng(random_u64()),
      ops_left(o.shuffle_every) {
  keys.rotate_to(key, salt);
}

shuffler::impl::~impl() {
  // Leases still open at this point are a caller's bug; their windows are wiped anyway.
  for (std::uint32_t i = 0; i < table.slots(); ++i) {
    const entry& e = table[i];
    if (e.st() == entry_state::open) drop_window(e);
  }
  if (spare.p != nullptr) window_resource->deallocate(spare.p, spare.bytes, spare.alignment);
  tag.used = table.generations_used();
}

shuffler_stats shuffler::impl::stats() const noexcept {
  shuffler_stats st = counters;
  st.reserved_bytes = heap.reserved_bytes();
  st.arenas = heap.arenas();
  st.metadata_bytes = table.metadata_bytes();
  st.metadata_huge_page_bytes = table.huge_page_bytes();
  st.arenas_released = heap.arenas_released();
  return st;
}

// --- entries --------------------------------------------------------------------------

handle shuffler::impl::alloc(std::size_t bytes, std::size_t alignment) {
  table.reserve_one();
  std::byte* p = heap.place(bytes + tag_bytes, alignment);  // nothing changed if it throws
  const std::uint32_t i = table.acquire();
  entry& e = table[i];
  e.data = p;
  e.size = bytes;
  e.align_log2 = static_cast<std::uint64_t>(std::countr_zero(alignment));
  e.set(entry_state::at_rest);
  if (!needs_work()) {
    std::memset(p, 0, bytes);  // a rent shows these very bytes: zero them now
    e.written = 1;
  }  // else the first rent shows zeros in its window (or decrypts nothing)
  ++counters.live_entries;
  counters.live_bytes += bytes;
  const handle h = table.handle_of(i);
  count_op();
  check_ratio();
  return h;
}

bool shuffler::impl::free(handle h) {
  entry& e = find_live(h);
  if (e.st() == entry_state::sealing) return false;  // its last lease is ending
  if (e.pins != 0) throw lease_error("memshuffle: free of a rented entry");
  if (e.st() == entry_state::open) doom_open(table.index_of(h));
  else doom(table.index_of(h));
  count_op();
  return true;
}

void shuffler::impl::free_when_returned(handle h) noexcept {
  entry* e = table.find(h);
  if (e == nullptr || e->free_on_return) return;
  const std::uint32_t i = table.index_of(h);
  if (e->pins != 0 || e->st() == entry_state::opening || e->st() == entry_state::sealing) {
    e->free_on_return = 1;  // invalid for users now; freed when its last lease ends
  } else if (e->st() == entry_state::open) {
    doom_open(i);
  } else {
    doom(i);
  }
}

entry& shuffler::impl::find_live(handle h) {
  entry* e = table.find(h);
  if (e == nullptr || e->free_on_return)
    throw invalid_handle_error("memshuffle: invalid, stale, freed or foreign handle");
  return *e;
}

std::byte* shuffler::impl::take_window(const entry& e) {
  if (spare.p != nullptr && spare.bytes == e.size && spare.alignment == e.alignment())
    return std::exchange(spare.p, nullptr);
  return static_cast<std::byte*>(window_resource->allocate(e.size, e.alignment()));
}

void shuffler::impl::give_window(window_block w) noexcept {
  secure_wipe(w.p, w.bytes);
  if (keep_spare && w.bytes <= spare_window_bytes) std::swap(w, spare);
  if (w.p != nullptr) window_resource->deallocate(w.p, w.bytes, w.alignment);
}

void shuffler::impl::drop_window(const entry& e) noexcept {
  if (window_resource == nullptr) return;
  std::byte* w = plaintext_of(e);
  if (w != nullptr) give_window({w, e.size, e.alignment()});
}

void shuffler::impl::doom(std::uint32_t i) noexcept {
  entry& e = table[i];
  if (e.written && e.key != no_key) keys.drop_user(e.key);
  e.key = no_key;
  e.pins = 0;
  e.free_on_return = 0;
  e.set(entry_state::doomed);
  table.invalidate(i);
  --counters.live_entries;
  counters.live_bytes -= e.size;
  ++counters.pending_free_entries;
}

void shuffler::impl::doom_open(std::uint32_t i) noexcept {
  entry& e = table[i];
  if (window_resource != nullptr) drop_window(e);
  else secure_wipe(e.data, e.size);
  doom(i);
}

// --- policies -------------------------------------------------------------------------

void shuffler::impl::count_op() noexcept {
  if (opt.shuffle_every == 0 || --ops_left != 0) return;
  ops_left = opt.shuffle_every;
  try_compact(compact_scope::every);
}

void shuffler::impl::check_ratio() noexcept {
  // Live bytes as stored, GCM tags included: no layout can hold less than that.
  const std::size_t stored = counters.live_bytes + counters.live_entries * tag_bytes;
  const double reserved = static_cast<double>(heap.reserved_bytes());
  // Slack of an arena or two (the one being filled, the ends of full ones) is what any
  // layout has; a shuffle could not remove it, so it never triggers one.
  if (opt.shuffle_above_ratio > 0 && reserved > opt.shuffle_above_ratio * static_cast<double>(stored) &&
      heap.reserved_bytes() > stored + 2 * heap.arena_size())
    try_compact(compact_scope::sparsest);
}

void shuffler::impl::try_compact(compact_scope scope) noexcept {
  try {
    compact(scope);
  } catch (...) {
    // Automatic: without memory the compaction stops after its last whole window.
  }
}

// --- rent -----------------------------------------------------------------------------

shuffler::impl::pinned shuffler::impl::pin_for_rent(open_job& job) {
  entry& e = find_live(job.h);
  if (job.size > e.size)
    throw type_error("memshuffle: rented type is larger than the entry (" + std::to_string(job.size) + " > " +
                     std::to_string(e.size) + " bytes)");
  if (job.alignment > e.alignment())
    throw type_error("memshuffle: entry aligned to " + std::to_string(e.alignment()) +
                     " cannot hold a type aligned to " + std::to_string(job.alignment));
  if (e.st() == entry_state::opening || e.st() == entry_state::sealing) return pinned::busy;
  if (e.st() == entry_state::open && e.pins == std::numeric_limits<std::uint16_t>::max())
    throw lease_error("memshuffle: too many leases open on one entry");
  job.index = table.index_of(job.h);
  const bool first = e.st() == entry_state::at_rest;
  if (first && full_active()) ++full.unsettled;
  if (first && needs_work()) {
    // The window is taken now: this can throw, and nothing has changed yet.
    if (window_resource != nullptr) job.window = take_window(e);
    job.data = e.data;
    job.bytes = e.size;
    job.seq = e.aux;
    job.written = e.written;
    job.key = e.written && encrypting ? &keys[e.key] : nullptr;
    e.set(entry_state::opening);
  } else if (first) {
    e.set(entry_state::open);
  }
  if (e.pins++ == 0) ++counters.pinned_entries;
  if (e.st() == entry_state::opening) return pinned::work;
  job.out = {plaintext_of(e), e.size};
  count_op();
  return pinned::done;
}

void shuffler::impl::open_outside(open_job& job) const noexcept {
  std::byte* const target = job.window != nullptr ? job.window : job.data;
  const std::size_t n = job.bytes;
  try {
    if (!job.written) {
      std::memset(target, 0, n);
    } else if (job.key != nullptr) {  // from the arena into the window (or in place)
      const auto aad = be64(static_cast<std::uint64_t>(job.h));
      job.key->c.open(iv_for(*job.key, counter_block(*job.key, job.seq)), aad_span(aad), {job.data, n}, {target, n},
                      {job.data + n, tag_bytes});
    } else if (job.window != nullptr) {
      std::memcpy(job.window, job.data, n);
    }
    job.result = outcome::done;
  } catch (const integrity_error&) {
    job.result = outcome::altered;
  } catch (...) {
    job.result = outcome::no_memory;  // the cipher's own allocation failed
  }
  if (job.result != outcome::done && job.window != nullptr) secure_wipe(job.window, n);
}

void shuffler::impl::commit_rent(open_job& job) {
  entry& e = table[job.index];
  if (job.result != outcome::done) {
    // A failed open leaves the entry at rest, exactly as it was.
    if (job.window != nullptr) give_window({job.window, job.bytes, e.alignment()});
    e.pins = 0;
    e.set(entry_state::at_rest);
    --counters.pinned_entries;
    if (job.result == outcome::no_memory) throw std::bad_alloc();
    ++counters.integrity_failures;
    throw integrity_error("memshuffle: the entry's ciphertext was altered");
  }
  e.set(entry_state::open);
  if (job.window != nullptr) e.aux = reinterpret_cast<std::uintptr_t>(job.window);
  if (job.key != nullptr) ++counters.decryptions;
  job.out = {plaintext_of(e), e.size};
  count_op();
}

// --- return ---------------------------------------------------------------------------

shuffler::impl::pinned shuffler::impl::pin_for_return(seal_job& job) {
  entry* e = table.find(job.h);  // an entry sealed<T> gave up while rented still counts
  if (e == nullptr) throw invalid_handle_error("memshuffle: return of an invalid, stale or foreign handle");
  if (e->st() != entry_state::open || e->pins == 0) throw lease_error("memshuffle: return without a rent");
  job.index = table.index_of(job.h);
  if (--e->pins != 0) {
    count_op();
    return pinned::done;
  }
  --counters.pinned_entries;
  if (e->free_on_return) {
    doom_open(job.index);
    return pinned::done;
  }
  if (!needs_work()) {
    e->set(entry_state::at_rest);
    if (on_return) relocate(job.index);
    count_op();
    return pinned::done;
  }
  // Encrypted under the current key, with a counter value never used.
  job.key_id = keys.current_id();
  job.key = &keys.current();
  job.seq = keys.begin_seal();
  job.data = e->data;
  job.window = window_resource != nullptr ? plaintext_of(*e) : nullptr;
  job.bytes = e->size;
  e->set(entry_state::sealing);
  return pinned::work;
}

void shuffler::impl::seal_outside(seal_job& job) const noexcept {
  const key_slot& k = *job.key;
  std::byte* const plain = job.window != nullptr ? job.window : job.data;
  // cipher::seal needs no memory (a GCM cipher keeps a reserve object), so a return
  // never fails for lack of it; the catch only keeps this noexcept.
  try {
    // From the window (or in place) into the arena; commit_return wipes the window.
    const auto aad = be64(static_cast<std::uint64_t>(job.h));
    k.c.seal(iv_for(k, counter_block(k, job.seq)), aad_span(aad), {plain, job.bytes}, {job.data, job.bytes},
             {job.data + job.bytes, tag_bytes});
  } catch (...) {
    job.result = outcome::no_memory;  // stays open, sealed on its next return
  }
}

void shuffler::impl::commit_return(seal_job& job) {
  entry& e = table[job.index];
  key_slot& k = keys[job.key_id];
  --k.sealing;
  if (job.result != outcome::done) {
    e.set(entry_state::open);
    keys.drop_user(job.key_id);
    throw std::bad_alloc();
  }
  drop_window(e);
  if (e.written && e.key != no_key) keys.drop_user(e.key);
  e.key = job.key_id;
  e.aux = job.seq;
  e.written = 1;
  e.set(entry_state::at_rest);
  ++k.encryptions, ++counters.encryptions;
  if (e.free_on_return) doom(job.index);
  else if (on_return) relocate(job.index);
  count_op();
}

}  // namespace memshuffle
