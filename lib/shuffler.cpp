// The shuffler proper: locking, leases, the cipher calls, policies and statistics.
// The handle table (handle_table.hpp) and the arenas (heap.hpp) are its two parts;
// both are used only under the lock here. The cipher work of rent and return runs
// outside the lock while the entry is marked opening or sealing, which keeps every
// other thread (and shuffle) away from that entry's bytes.
#include <memshuffle/shuffler.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <new>
#include <bit>
#include <stdexcept>
#include <vector>

#include <crypto++/secblock.h>

#include "handle_table.hpp"
#include "heap.hpp"

namespace memshuffle {

namespace {

using detail::entry;
using detail::entry_state;
using detail::no_key;

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

// One key with its salt and its encryption counter. Every encryption under the key
// takes the next counter value, so no counter block is ever used twice under it.
struct key_slot {
  key_slot(cipher_kind kind, const CryptoPP::SecByteBlock& key, const CryptoPP::SecByteBlock& s)
      : c(kind, std::as_bytes(std::span(key.data(), key.size()))), salt(s), next_seq(random_u64()) {}

  cipher c;
  CryptoPP::SecByteBlock salt;
  std::uint64_t next_seq;       // starts at a random value, then counts up (mod 2^64)
  std::uint64_t encryptions = 0;
  std::size_t users = 0;    // entries whose ciphertext is, or is being made, under this key
  std::size_t sealing = 0;  // encryptions under way outside the lock
};

// CTR initial counter block: (salt XOR be64(seq)) || be64(0), the low half counting
// the entry's blocks from 0. The GCM nonce is its first 12 bytes.
std::array<std::byte, 16> counter_block(const key_slot& k, std::uint64_t seq) {
  std::array<std::byte, 16> iv{};
  for (int i = 0; i < 8; ++i)
    iv[i] = static_cast<std::byte>(k.salt[i] ^ static_cast<std::uint8_t>(seq >> (56 - 8 * i)));
  return iv;
}

// One GCM message: its 32-bit block counter covers 2^32 - 2 blocks of plaintext
// (NIST SP 800-38D: at most 2^39 - 256 bits).
constexpr std::size_t gcm_max_entry = (std::size_t{1} << 36) - 32;

std::array<std::byte, 8> be64(std::uint64_t v) {
  std::array<std::byte, 8> out{};
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>(v >> (56 - 8 * i));
  return out;
}

// xoshiro256** (Blackman and Vigna): the layout only needs to be unpredictable enough
// to spread entries, and it is drawn once per entry per shuffle, so speed matters.
class layout_rng {
 public:
  explicit layout_rng(std::uint64_t seed) {
    for (auto& w : s_) {  // splitmix64 expands the seed
      seed += 0x9E3779B97F4A7C15;
      std::uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
      w = z ^ (z >> 31);
    }
  }
  std::uint64_t operator()() noexcept {
    const std::uint64_t result = std::rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0], s_[3] ^= s_[1], s_[1] ^= s_[2], s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = std::rotl(s_[3], 45);
    return result;
  }

 private:
  std::uint64_t s_[4];
};

// A number below bound (< 2^32), by multiply-shift instead of a division.
std::size_t bounded(layout_rng& rng, std::size_t bound) {
  return static_cast<std::size_t>(((rng() & 0xFFFF'FFFF) * bound) >> 32);
}

template <class T>
void shuffle_range(std::span<T> v, layout_rng& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[bounded(rng, i)]);
}

std::span<const std::byte> iv_for(const key_slot& k, const std::array<std::byte, 16>& block) {
  return k.c.kind() == cipher_kind::aes_256_gcm ? std::span(block).first(cipher::gcm_nonce_size)
                                                 : std::span(block);
}

}  // namespace

struct shuffler::impl {
  impl(const shuffler_options& o, std::pmr::memory_resource* up)
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

  ~impl() {
    // Leases still open at this point are a caller's bug; their windows are wiped anyway.
    for (std::uint32_t i = 0; i < table.slots(); ++i) {
      const entry& e = table[i];
      if (e.st() == entry_state::open) drop_window(e);
    }
  }

  shuffler_options opt;
  std::pmr::memory_resource* upstream;
  const bool encrypting;
  const std::size_t tag_bytes;
  bool on_return;

  mutable std::mutex m;
  std::condition_variable cv;  // an entry left opening or sealing
  detail::handle_table table;
  detail::heap heap;
  std::vector<std::unique_ptr<key_slot>> keys;
  std::uint16_t current_key = no_key;
  layout_rng rng;

  // The incremental pass under way.
  struct pass_state {
    bool active = false;
    std::vector<std::uint32_t> order;
    std::size_t cursor = 0;
    std::uint64_t serial = 0;  // arenas older than this are being emptied
  } pass;

  // Reused between shuffles so a steady heap does not allocate for them.
  std::vector<std::uint32_t> moves, doomed, run_end;
  std::vector<std::size_t> run_bytes;
  struct move_item {
    std::byte* src;
    std::size_t bytes;
    std::uint32_t index, align_log2;
  };
  std::vector<move_item> items;
  std::vector<detail::move> plan;  // a full shuffle's moves, by source arena, in slot order
  std::vector<std::uint32_t> placement;  // the order plan's moves are placed in
  std::vector<detail::window> windows;
  std::vector<std::byte*> stays, dest;
  std::vector<detail::request> reqs;

  std::uint64_t ops = 0;
  std::size_t live_entries = 0, live_bytes = 0, pinned = 0, pending_free = 0;
  std::uint64_t shuffles = 0, bytes_moved = 0, encryptions = 0, decryptions = 0,
                key_rotations = 0, integrity_failures = 0, relocated_on_return = 0;
  std::chrono::nanoseconds shuffle_time{0};

  std::size_t stored_bytes(const entry& e) const noexcept { return e.size + tag_bytes; }
  std::byte* plaintext_of(const entry& e) const noexcept {
    return opt.plaintext_resource != nullptr ? reinterpret_cast<std::byte*>(static_cast<std::uintptr_t>(e.aux))
                                             : e.data;
  }
  // Whether renting or returning the entry does work outside the lock.
  bool needs_work() const noexcept { return encrypting || opt.plaintext_resource != nullptr; }

  // --- keys -------------------------------------------------------------------------

  // Null key or salt: a random one. (Pointers, so no copy of a key is left behind.)
  std::uint16_t add_key(const key_type* key, const salt_type* salt) {
    CryptoPP::SecByteBlock k(cipher::key_size), s(sizeof(salt_type));
    if (key) std::memcpy(k.data(), key->data(), k.size());
    else os_random(std::as_writable_bytes(std::span(k.data(), k.size())));
    if (salt) std::memcpy(s.data(), salt->data(), s.size());
    else os_random(std::as_writable_bytes(std::span(s.data(), s.size())));
    auto slot = std::make_unique<key_slot>(opt.cipher, k, s);
    auto free_slot = std::find(keys.begin(), keys.end(), nullptr);
    if (free_slot != keys.end()) {
      *free_slot = std::move(slot);
      return static_cast<std::uint16_t>(free_slot - keys.begin());
    }
    if (keys.size() >= no_key) throw std::length_error("memshuffle: too many keys in use at once");
    keys.push_back(std::move(slot));
    return static_cast<std::uint16_t>(keys.size() - 1);
  }

  void drop_user(std::uint16_t id) noexcept {
    --keys[id]->users;
    drop_if_unused(id);
  }
  // A key that is not current and that no entry needs any more is destroyed (wiped).
  void drop_if_unused(std::uint16_t id) noexcept {
    const key_slot& k = *keys[id];
    if (k.users == 0 && k.sealing == 0 && id != current_key) keys[id].reset();
  }

  // --- entries ------------------------------------------------------------------------

  entry& find_live(handle h) {
    entry* e = table.find(h);
    if (e == nullptr || e->free_on_return)
      throw invalid_handle_error("memshuffle: invalid, stale, freed or foreign handle");
    return *e;
  }

  void drop_window(const entry& e) noexcept {
    if (opt.plaintext_resource == nullptr) return;
    std::byte* w = plaintext_of(e);
    if (w == nullptr) return;
    secure_wipe(w, e.size);
    opt.plaintext_resource->deallocate(w, e.size, e.alignment());
  }

  // Frees slot i: its handles are invalid at once, its bytes wait for the next shuffle.
  void doom(std::uint32_t i) noexcept {
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

  // An entry left open with no lease (its encryption failed) is freed: wipe its plaintext.
  void doom_open(std::uint32_t i) noexcept {
    entry& e = table[i];
    if (opt.plaintext_resource != nullptr) drop_window(e);
    else secure_wipe(e.data, e.size);
    doom(i);
  }

  // --- policies -----------------------------------------------------------------------

  void count_op() noexcept {
    ++ops;
    if (opt.shuffle_every != 0 && ops % opt.shuffle_every == 0) try_shuffle();
  }

  void check_ratio() noexcept {
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

  // shuffle_every: every entry at rest moves, arena by arena as the ratio policy's
  // compaction does, so the upstream never holds the old and new heap at once.
  void try_shuffle() noexcept {
    try {
      compact();
    } catch (...) {
      // Automatic: without memory the compaction stops after its last whole window.
    }
  }

  // --- shuffling ----------------------------------------------------------------------

  void timed(std::chrono::steady_clock::time_point t0) {
    shuffle_time += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
  }

  // A full shuffle, rolling (docs/design.md, "Heap"): the entries at rest leave their
  // arenas one source arena (a window) at a time, windows in random order and entries
  // in random order within each, and every arena emptied this way is a destination for
  // the windows after it. So the upstream holds the heap plus a few arenas at the
  // peak, and memory it already had is reused instead of fresh pages.
  void shuffle_all() {
    const auto t0 = std::chrono::steady_clock::now();
    gather_by_arena();
    order_windows();
    heap.begin_shuffle(plan, placement, windows, stays);  // the only step that can fail; nothing changed yet
    for (const detail::window& w : windows) {
      const std::span<const detail::move> batch(plan.data() + w.first, w.last - w.first);
      heap.move_window(batch, w.arena);
      // Slots come in order, but entries allocated into freed slots lie in other arenas
      // than their neighbours: asking early hides the misses they cost.
      constexpr std::size_t ahead = 16;
      for (std::size_t k = 0; k < batch.size(); ++k) {
        if (k + ahead < batch.size()) __builtin_prefetch(&table[batch[k + ahead].slot], 1);
        table[batch[k].slot].data = batch[k].to;
        bytes_moved += batch[k].bytes;
      }
    }
    for (std::uint32_t i : doomed) {
      heap.drop(table[i].data, stored_bytes(table[i]));
      table.recycle(i);
    }
    pending_free -= doomed.size();
    heap.end_shuffle();
    pass.active = false;
    ++shuffles;
    timed(t0);
  }

  // One pass over the slots: the entries at rest go to their arena's run of plan (each
  // arena's run is as long as the entries it holds, so nothing is sorted), the freed
  // ones to doomed, the pinned or in transition ones to stays; then one window per
  // arena with entries to move.
  void gather_by_arena() {
    doomed.clear(), stays.clear(), windows.clear();
    heap.index_arenas();
    const auto arenas = static_cast<std::uint32_t>(heap.arenas());
    run_end.resize(arenas);
    run_bytes.assign(arenas, 0);
    std::uint32_t total = 0;
    for (std::uint32_t a = 0; a < arenas; ++a) {
      run_end[a] = total;  // the next free place of the run, for now
      total += static_cast<std::uint32_t>(heap.entries_in(a));
    }
    if (plan.size() < total) plan.resize(total);
    if (placement.size() < total) placement.resize(total);
    windows.reserve(arenas);
    for (std::uint32_t i = 0; i < table.slots(); ++i) {
      const entry& e = table[i];
      switch (e.st()) {
        case entry_state::at_rest: {
          const std::uint32_t a = heap.arena_number(e.data);
          plan[run_end[a]++] = {e.data, nullptr, stored_bytes(e), i, static_cast<std::uint32_t>(e.align_log2)};
          run_bytes[a] += stored_bytes(e);
          break;
        }
        case entry_state::doomed: doomed.push_back(i); break;
        case entry_state::unused: break;
        default: stays.push_back(e.data); break;
      }
    }
    std::uint32_t first = 0;
    for (std::uint32_t a = 0; a < arenas; ++a) {
      if (run_end[a] != first) windows.push_back({a, first, run_end[a], run_bytes[a], false});
      first += static_cast<std::uint32_t>(heap.entries_in(a));
    }
  }

  // With randomize_layout: the windows of about an arena's worth in random order, each
  // to an arena of its own, then the smaller ones in random order, packed; entries in
  // random order within each window. The new layout keeps no trace of the old one, yet
  // an arena's entries (which, after allocation, sit in neighbouring slots) stay
  // together, so both the slots and the bytes are walked nearly in order. (Packed in
  // random order, full windows would share arenas with random others, and after a few
  // shuffles every slot would lie in a random arena.) Without randomize_layout: arenas
  // in the order they were filled, entries by address, packed: the order is kept.
  void order_windows() {
    for (const detail::window& w : windows)
      for (std::uint32_t k = w.first; k < w.last; ++k) placement[k] = k;
    if (!opt.randomize_layout) {
      std::sort(windows.begin(), windows.end(), [&](const detail::window& x, const detail::window& y) {
        return heap.serial_at(x.arena) < heap.serial_at(y.arena);
      });
      const auto by_address = [&](std::uint32_t x, std::uint32_t y) { return plan[x].from < plan[y].from; };
      for (const detail::window& w : windows) {
        const auto first = placement.begin() + w.first, last = placement.begin() + w.last;
        if (!std::is_sorted(first, last, by_address)) std::sort(first, last, by_address);
      }
      return;
    }
    for (detail::window& w : windows) w.whole = w.bytes >= opt.arena_size - opt.arena_size / 16;
    const auto partial = std::partition(windows.begin(), windows.end(), [](const detail::window& w) { return w.whole; });
    shuffle_range(std::span(windows.begin(), partial), rng);
    shuffle_range(std::span(partial, windows.end()), rng);
    for (const detail::window& w : windows)
      for (std::uint32_t k = w.last - w.first; k > 1; --k)
        std::swap(placement[w.first + k - 1], placement[w.first + bounded(rng, k)]);
  }

  // The ratio policy's compaction: entries move in address order, an arena's worth at a
  // time (in random order within that window when randomize_layout), and each source
  // arena goes back as soon as it is empty. So the heap never holds old and new copies
  // of everything at once, as a full shuffle does; each step is all or nothing.
  void compact() {
    const auto t0 = std::chrono::steady_clock::now();
    for (std::uint32_t i = 0; i < table.slots(); ++i) {
      if (table[i].st() != entry_state::doomed) continue;
      heap.vacate(table[i].data, stored_bytes(table[i]));
      table.recycle(i);
      --pending_free;
    }
    items.clear();
    for (std::uint32_t i = 0; i < table.slots(); ++i) {
      const entry& e = table[i];
      if (e.st() == entry_state::at_rest)
        items.push_back({e.data, stored_bytes(e), i, static_cast<std::uint32_t>(e.align_log2)});
    }
    std::sort(items.begin(), items.end(), [](const move_item& x, const move_item& y) { return x.src < y.src; });
    const std::uint64_t serial = heap.next_serial();
    for (std::size_t first = 0; first < items.size();) {
      std::size_t last = first, window = 0;
      while (last < items.size() && (window < heap.arena_size() || last == first)) window += items[last++].bytes;
      const std::span<move_item> batch(items.data() + first, last - first);
      if (opt.randomize_layout)
        for (std::size_t k = batch.size(); k > 1; --k) std::swap(batch[k - 1], batch[bounded(rng, k)]);
      reqs.clear();
      for (const move_item& m : batch) reqs.push_back({m.bytes, std::size_t{1} << m.align_log2});
      dest.resize(batch.size());
      heap.place_all(reqs, dest, first == 0);  // the first batch opens a fresh arena
      for (std::size_t k = 0; k < batch.size(); ++k) {
        std::memcpy(dest[k], batch[k].src, batch[k].bytes);
        heap.vacate(batch[k].src, batch[k].bytes);
        table[batch[k].index].data = dest[k];
        bytes_moved += batch[k].bytes;
      }
      first = last;
    }
    heap.release_empty_older(serial);
    ++shuffles;
    timed(t0);
  }

  void shuffle_step(std::size_t budget) {
    const auto t0 = std::chrono::steady_clock::now();
    const bool starting = !pass.active;
    std::vector<std::uint32_t> order;
    std::uint64_t serial = pass.serial;
    std::size_t cursor = pass.cursor;
    if (starting) {
      for (std::uint32_t i = 0; i < table.slots(); ++i)
        if (table[i].live()) order.push_back(i);
      if (opt.randomize_layout) shuffle_range(std::span(order), rng);
      serial = heap.next_serial();
      cursor = 0;
    }
    const auto& walk = starting ? order : pass.order;
    moves.clear(), reqs.clear();
    std::size_t planned = 0;
    for (; cursor < walk.size() && (planned < budget || moves.empty()); ++cursor) {
      const entry& e = table[walk[cursor]];
      if (e.st() != entry_state::at_rest || heap.serial_of(e.data) >= serial) continue;
      moves.push_back(walk[cursor]);
      reqs.push_back({stored_bytes(e), e.alignment()});
      planned += stored_bytes(e);
    }
    dest.resize(moves.size());
    heap.place_all(reqs, dest, starting);  // nothing changed if this throws

    if (starting) {
      pass.order.swap(order);
      pass.serial = serial;
      pass.active = true;
      for (std::uint32_t i = 0; i < table.slots(); ++i) {
        if (table[i].st() != entry_state::doomed) continue;
        heap.vacate(table[i].data, stored_bytes(table[i]));
        table.recycle(i);
        --pending_free;
      }
    }
    for (std::size_t k = 0; k < moves.size(); ++k) {
      entry& e = table[moves[k]];
      const std::size_t n = stored_bytes(e);
      std::memcpy(dest[k], e.data, n);
      heap.vacate(e.data, n);
      e.data = dest[k];
      bytes_moved += n;
    }
    pass.cursor = cursor;
    if (cursor == pass.order.size()) {
      pass.active = false;
      pass.order.clear();
      heap.release_empty_older(pass.serial);
      ++shuffles;
    }
    timed(t0);
  }

  // Shuffle on return: the entry alone moves to a new place; without memory it stays.
  void relocate(std::uint32_t i) noexcept {
    entry& e = table[i];
    const std::size_t n = stored_bytes(e);
    std::byte* to = nullptr;
    try {
      to = heap.place(n, e.alignment());
    } catch (...) {
      return;
    }
    std::memcpy(to, e.data, n);
    heap.vacate(e.data, n);
    e.data = to;
    bytes_moved += n;
    ++relocated_on_return;
  }

  // --- rotation -----------------------------------------------------------------------

  // Re-encryption runs in batches of about this many bytes: under the lock a batch of
  // entries at rest under an older key is marked sealing (nobody else touches their
  // bytes then) and given counter values; outside it the batch is re-encrypted in a
  // scratch buffer and copied back; under the lock again each entry is committed. So a
  // rotation of a large heap holds the lock only for bookkeeping, never for its AES work.
  static constexpr std::size_t rotation_batch_bytes = 64 * 1024;
  static constexpr std::size_t rotation_batch_entries = 256;

  struct reseal {
    std::uint32_t index;
    handle h;  // read under the lock: the table may grow while the batch is worked on
    const key_slot* from;
    std::uint16_t from_id;
    std::uint64_t from_seq, to_seq;
    std::byte* data;
    std::size_t size, offset;  // offset: where it is worked on in the scratch buffer
    enum class outcome : std::uint8_t { done, altered, no_memory } result;
  };

  void rotate(const key_type* key, const salt_type* salt, std::unique_lock<std::mutex>& lk) {
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

  // Marks the next entries (from slot cursor on) to move to key `to`; returns where the
  // walk stops. The scratch buffer grows for an entry larger than it, alone in its batch.
  std::uint32_t mark_batch(std::uint32_t cursor, std::uint16_t to, std::vector<reseal>& batch,
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

  // Outside the lock: decrypt a copy under the old key, encrypt it under the new one, and
  // copy it back only when whole, so a failure leaves the entry as it was.
  void reencrypt(reseal& r, const key_slot& k, std::span<std::byte> scratch) const noexcept {
    const std::size_t n = r.size + tag_bytes;
    std::byte* buf = scratch.data() + r.offset;
    std::memcpy(buf, r.data, n);
    const auto aad = be64(static_cast<std::uint64_t>(r.h));
    try {
      r.from->c.open(iv_for(*r.from, counter_block(*r.from, r.from_seq)), aad_span(aad), {buf, r.size},
                     {buf + r.size, tag_bytes});
      k.c.seal(iv_for(k, counter_block(k, r.to_seq)), aad_span(aad), {buf, r.size}, {buf + r.size, tag_bytes});
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

  // Returns whether every entry of the batch moved to the new key or was found altered.
  bool commit_batch(std::span<const reseal> batch, std::uint16_t to) noexcept {
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

  std::span<const std::byte> aad_span(const std::array<std::byte, 8>& aad) const noexcept {
    return tag_bytes != 0 ? std::span<const std::byte>(aad) : std::span<const std::byte>();
  }

  void maybe_rotate(std::unique_lock<std::mutex>& lk) noexcept {
    if (opt.rotate_key_every == 0 || keys[current_key]->encryptions < opt.rotate_key_every) return;
    try {
      rotate(nullptr, nullptr, lk);
    } catch (...) {
      // Tried again after the next encryption.
    }
  }

  // --- rent and return ----------------------------------------------------------------

  rented rent(handle h, std::size_t size, std::size_t alignment);
  void give_back(handle h);
};

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
