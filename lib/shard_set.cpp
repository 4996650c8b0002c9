// The shards of a shuffler: which thread allocates where, which shard a handle names,
// the keys of shards made later, and the calls that visit every shard (shard_set.hpp).
#include "shard_set.hpp"

#include <memshuffle/os_random.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <bit>
#include <limits>
#include <new>
#include <optional>
#include <stdexcept>
#include <utility>

#include "handle_table.hpp"
#include "key_ring.hpp"
#include "secret_memory.hpp"

namespace memshuffle {

namespace {

// Thread ordinals: a thread takes the lowest one no live thread holds and gives it back
// when it ends, so a program that starts many short-lived threads keeps to the shards
// it has made. The first reusable_ordinals are bits of a fixed bitmap, taken and given
// back by compare-exchange: no lock, so a child of fork() never waits for one that
// another thread of its parent held. Beyond them a counter hands out ordinals for good.
constexpr std::size_t no_ordinal = std::numeric_limits<std::size_t>::max();
constexpr std::size_t reusable_ordinals = 1024;
constinit std::array<std::atomic<std::uint64_t>, reusable_ordinals / 64> taken_ordinals{};
constinit std::atomic<std::size_t> next_ordinal{reusable_ordinals};

// Read on every allocation: trivial, so it is read without a call to a TLS wrapper.
constinit thread_local std::size_t thread_ordinal = no_ordinal;
// Whether thread_ordinal was taken, so is given back, rather than set by hand.
constinit thread_local bool ordinal_taken = false;

std::size_t take_lowest_ordinal() noexcept {
  for (std::size_t w = 0; w < taken_ordinals.size(); ++w) {
    std::uint64_t bits = taken_ordinals[w].load(std::memory_order_relaxed);
    while (bits != ~std::uint64_t{0}) {
      const int b = std::countr_one(bits);
      if (taken_ordinals[w].compare_exchange_weak(bits, bits | (std::uint64_t{1} << b), std::memory_order_relaxed))
        return w * 64 + static_cast<std::size_t>(b);
    }
  }
  return next_ordinal.fetch_add(1, std::memory_order_relaxed);
}

void give_back_taken_ordinal() noexcept {
  if (!ordinal_taken) return;
  ordinal_taken = false;
  if (thread_ordinal < reusable_ordinals)
    taken_ordinals[thread_ordinal / 64].fetch_and(~(std::uint64_t{1} << thread_ordinal % 64), std::memory_order_relaxed);
}

// Gives a taken ordinal back when its thread ends. It has a destructor, so reaching it
// goes through a TLS wrapper: only a thread taking an ordinal touches it.
struct ordinal_at_exit {
  ~ordinal_at_exit() {
    give_back_taken_ordinal();
    // A thread_local destructor that runs later and allocates uses shard 0, which
    // always exists, rather than take an ordinal again.
    thread_ordinal = 0;
  }
};
thread_local ordinal_at_exit at_exit;

[[gnu::noinline]] std::size_t take_ordinal() noexcept {
  thread_ordinal = take_lowest_ordinal();
  ordinal_taken = true;
  static_cast<void>(at_exit);  // its first touch registers its destructor
  return thread_ordinal;
}

std::size_t ordinal() noexcept {
  if (thread_ordinal == no_ordinal) [[unlikely]]
    return take_ordinal();
  return thread_ordinal;
}

constexpr unsigned tag_shift = detail::handle_table::index_bits + detail::handle_table::generation_bits;

// A key and salt in secret memory, wiped and given back when it ends.
template <class Block>
struct secret_block {
  secret_block() : p(::new (detail::secret_memory()->allocate(sizeof(Block), alignof(Block))) Block{}) {}
  explicit secret_block(Block* adopted) noexcept : p(adopted) {}
  ~secret_block() {
    if (p == nullptr) return;
    secure_wipe(p, sizeof(Block));
    detail::secret_memory()->deallocate(p, sizeof(Block), alignof(Block));
  }
  secret_block(const secret_block&) = delete;
  secret_block& operator=(const secret_block&) = delete;
  Block* release() noexcept { return std::exchange(p, nullptr); }
  Block* p;
};

// Shard i's key and salt, derived from the seed into secret memory.
template <class Block>
void derive(std::optional<secret_block<Block>>& out, const Block& seed, std::size_t i) {
  out.emplace();
  detail::derive_shard_key(seed.key, seed.salt, static_cast<std::uint16_t>(i), out->p->key, out->p->salt);
}

void add_to(shuffler_stats& to, const shuffler_stats& s) noexcept {
  to.live_entries += s.live_entries;
  to.live_bytes += s.live_bytes;
  to.reserved_bytes += s.reserved_bytes;
  to.arenas += s.arenas;
  to.metadata_bytes += s.metadata_bytes;
  to.metadata_huge_page_bytes += s.metadata_huge_page_bytes;
  to.shuffles += s.shuffles;
  to.bytes_moved += s.bytes_moved;
  to.arenas_released += s.arenas_released;
  to.encryptions += s.encryptions;
  to.decryptions += s.decryptions;
  to.key_rotations += s.key_rotations;
  to.shuffle_time += s.shuffle_time;
  to.pinned_entries += s.pinned_entries;
  to.pending_free_entries += s.pending_free_entries;
  to.integrity_failures += s.integrity_failures;
  to.entries_relocated_on_return += s.entries_relocated_on_return;
}

}  // namespace

void detail::set_thread_ordinal(std::size_t o) noexcept {
  give_back_taken_ordinal();
  thread_ordinal = o;  // held by hand: never given back, nor kept from other threads
}

shuffler::shard_set::shard_set(const shuffler_options& o, const key_type* key, const salt_type* salt,
                               std::pmr::memory_resource* up)
    : count(o.shards), opt(o), upstream(up) {
  if (count == 0 || count > max_shards) throw std::invalid_argument("memshuffle::shuffler: shards must be 1 to 64");
  if (o.plaintext_resource != nullptr) opt.plaintext_resource = &windows.emplace(o.plaintext_resource);
  if (key != nullptr && count > 1 && o.cipher != cipher_kind::none) {
    salt_type drawn{};
    if (salt == nullptr) os_random(drawn);
    keep_seed(*key, salt != nullptr ? *salt : drawn);
    secure_wipe(drawn.data(), drawn.size());
    key = &seed->key, salt = &seed->salt;
  }
  try {
    auto* s = new synchronized(opt, key, salt, &upstream);
    tags[0].store(s->core.table.tag(), std::memory_order_relaxed);
    shards[0].store(s, std::memory_order_release);
  } catch (...) {
    drop_seed();
    throw;
  }
}

shuffler::shard_set::~shard_set() {
  for (auto& s : shards) delete s.load(std::memory_order_relaxed);
  drop_seed();
}

void shuffler::shard_set::check_fork() const {
  if (forked()) throw fork_error("memshuffle: a shuffler of the parent process used in a child of fork()");
}

void shuffler::shard_set::keep_seed(const key_type& key, const salt_type& salt) {
  secret_block<seed_block> fresh;  // may throw: the old seed is still there
  fresh.p->key = key;
  fresh.p->salt = salt;
  drop_seed();
  seed = fresh.release();
}

void shuffler::shard_set::drop_seed() noexcept {
  if (seed != nullptr) secret_block<seed_block>{std::exchange(seed, nullptr)};  // wiped, given back
}

shuffler::synchronized& shuffler::shard_set::for_alloc() {
  const std::size_t i = count == 1 ? 0 : ordinal() % count;
  // A shard found is checked by its lock(); one to make is checked here, as making it
  // would touch secret memory, which a child of fork() does not have.
  if (synchronized* s = shards[i].load(std::memory_order_acquire)) [[likely]]
    return *s;
  check_fork();
  try {
    return make(i);
  } catch (const std::bad_alloc&) {
  } catch (const error&) {
  }
  // No memory or no handle tag for a new shard: the thread shares shard 0, which
  // always exists, rather than failing an allocation that shard can serve.
  return *shards[0].load(std::memory_order_relaxed);
}

shuffler::synchronized& shuffler::shard_set::make(std::size_t i) {
  const std::lock_guard g(make_m);
  if (synchronized* s = shards[i].load(std::memory_order_relaxed)) return *s;
  // With a seed the shard's key is derived from it; without, it is random.
  std::optional<secret_block<seed_block>> derived;
  if (seed != nullptr) derive(derived, *seed, i);
  auto* s = new synchronized(opt, derived ? &derived->p->key : nullptr, derived ? &derived->p->salt : nullptr,
                             &upstream);
  shards[i].store(s, std::memory_order_release);
  tags[i].store(s->core.table.tag(), std::memory_order_release);
  return *s;
}

shuffler::synchronized* shuffler::shard_set::find(handle h) const noexcept {
  const auto tag = static_cast<std::uint16_t>(static_cast<std::uint64_t>(h) >> tag_shift);
  if (tag == 0) return nullptr;  // no table has tag 0 (invalid_handle has it)
  for (std::size_t i = 0; i < count; ++i)
    if (tags[i].load(std::memory_order_acquire) == tag) return shards[i].load(std::memory_order_acquire);
  return nullptr;
}

shuffler::synchronized& shuffler::shard_set::of(handle h) const {
  // The shard's lock() checks for a fork; a handle of no shard is checked here.
  synchronized* s = find(h);
  if (s != nullptr) [[likely]]
    return *s;
  check_fork();
  throw invalid_handle_error("memshuffle: invalid, stale, freed or foreign handle");
}

void shuffler::shard_set::step(std::size_t budget) {
  check_fork();
  const std::lock_guard g(step_m);
  for (std::size_t tries = 0; tries < count; ++tries, step_at = (step_at + 1) % count) {
    synchronized* s = shards[step_at].load(std::memory_order_acquire);
    if (s == nullptr) continue;
    auto lk = s->lock();
    s->core.shuffle(budget);
    // The shard's pass ended (or had nothing to do): the next step begins the next one's.
    if (!s->core.pass.active) step_at = (step_at + 1) % count;
    return;
  }
}

void shuffler::shard_set::rotate(const key_type* key, const salt_type* salt) {
  check_fork();
  const std::lock_guard g(make_m);
  if (key != nullptr && count > 1 && opt.cipher != cipher_kind::none) keep_seed(*key, *salt);
  else drop_seed();
  for (std::size_t i = 0; i < count; ++i) {
    synchronized* s = shards[i].load(std::memory_order_relaxed);
    if (s == nullptr) continue;
    std::optional<secret_block<seed_block>> derived;
    const key_type* k = key;
    const salt_type* sa = salt;
    if (seed != nullptr && i != 0) {
      derive(derived, *seed, i);
      k = &derived->p->key, sa = &derived->p->salt;
    }
    auto lk = s->lock();
    s->rotate(lk, k, sa);
  }
}

void shuffler::shard_set::set_on_return(bool on) {
  check_fork();
  const std::lock_guard g(make_m);
  opt.shuffle_on_return = on;
  each([&](synchronized& s) {
    auto lk = s.lock();
    s.core.on_return = on;
  });
}

shuffler_stats shuffler::shard_set::stats() const {
  check_fork();
  // Every shard locked at once (in index order), so the sums are of one moment.
  std::array<std::unique_lock<std::mutex>, max_shards> locks;
  std::array<const synchronized*, max_shards> locked{};
  std::size_t n = 0;
  each([&](synchronized& s) {
    locks[n] = s.lock();
    locked[n++] = &s;
  });
  shuffler_stats sum;
  for (std::size_t i = 0; i < n; ++i) add_to(sum, locked[i]->core.stats());
  return sum;
}

}  // namespace memshuffle
