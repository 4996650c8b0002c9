// The public members of the shuffler: argument checks, the shard a call goes to
// (shard_set.hpp), the lock and the fork check (shuffler_sync.hpp) around the
// algorithm (shuffler_impl.hpp).
#include <memshuffle/shuffler.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "shard_set.hpp"

namespace memshuffle {

namespace {

// One GCM message: its 32-bit block counter covers 2^32 - 2 blocks of plaintext
// (NIST SP 800-38D: at most 2^39 - 256 bits).
constexpr std::size_t gcm_max_entry = (std::size_t{1} << 36) - 32;

void check(const shuffler_options& o, std::pmr::memory_resource* upstream) {
  if (upstream == nullptr) throw std::invalid_argument("memshuffle::shuffler: null upstream resource");
  if (o.arena_size == 0) throw std::invalid_argument("memshuffle::shuffler: arena_size is 0");
  if (!(o.shuffle_above_ratio >= 0) || std::isinf(o.shuffle_above_ratio))
    throw std::invalid_argument("memshuffle::shuffler: shuffle_above_ratio must be finite and >= 0");
  if (o.cipher != cipher_kind::none && o.cipher != cipher_kind::aes_256_ctr && o.cipher != cipher_kind::aes_256_gcm)
    throw std::invalid_argument("memshuffle::shuffler: unknown cipher_kind");
  if (o.plaintext_in_place && o.plaintext_resource != nullptr)
    throw std::invalid_argument("memshuffle::shuffler: plaintext_in_place and a plaintext_resource exclude each other");
}

}  // namespace

template <class T>
static void wipe_optional(std::optional<T>& v) noexcept {
  if (v) secure_wipe(v->data(), v->size());
  v.reset();
}

shuffler::shuffler(shuffler_options options, std::pmr::memory_resource* upstream) {
  struct wipe_secrets {
    shuffler_options& o;
    ~wipe_secrets() {
      wipe_optional(o.key);
      wipe_optional(o.salt);
    }
  } wipe{options};
  check(options, upstream);
  shuffler_options rest = options;  // the options the shuffler keeps: no key, no salt
  wipe_optional(rest.key);
  wipe_optional(rest.salt);
  s_ = std::make_unique<shard_set>(rest, options.key ? &*options.key : nullptr,
                                      options.salt ? &*options.salt : nullptr, upstream);
}

shuffler::~shuffler() {
  // Ending in a child of fork(): the shuffler's memory is the parent's image (and its
  // secret memory is not mapped here), so it is never touched again. Kept reachable,
  // so a leak checker does not count it.
  static std::atomic<shard_set*> abandoned{nullptr};
  if (s_ && s_->forked()) {
    shard_set* s = s_.release();
    s->next_abandoned = abandoned.load(std::memory_order_relaxed);
    while (!abandoned.compare_exchange_weak(s->next_abandoned, s, std::memory_order_relaxed)) {
    }
  }
}

handle shuffler::alloc_bytes(std::size_t bytes, std::size_t alignment) {
  if (bytes > detail::handle_table::max_entry_size)
    throw type_error("memshuffle: entry of " + std::to_string(bytes) + " bytes is too large");
  synchronized& s = s_->for_alloc();
  auto lk = s.lock();
  // Refused now: sealing it would fail only when its first lease ends, which cannot
  // throw, and the entry would stay plaintext.
  if (s.core.tag_bytes != 0 && bytes > gcm_max_entry)
    throw type_error("memshuffle: entry of " + std::to_string(bytes) +
                     " bytes is larger than one AES-GCM message can be (2^36 - 32 bytes)");
  return s.core.alloc(bytes, alignment);
}

void shuffler::free(handle h) {
  synchronized& s = s_->of(h);
  auto lk = s.lock();
  s.cv.wait(lk, [&] { return s.core.free(h); });
}

shuffler::rented shuffler::synchronized::rent(handle h, std::size_t size, std::size_t alignment) {
  auto lk = lock();
  impl::open_job job{.h = h, .size = size, .alignment = alignment};
  transition(
      lk,
      [&] {
        for (;;) {
          const auto p = core.pin_for_rent(job);
          if (p == impl::pinned::work) return place(job.bytes);
          if (p == impl::pinned::done) return work_at::nowhere;
          cv.wait(lk);  // opening or sealing: wait for it, then look again
        }
      },
      [&] { core.open_outside(job); }, [&] { core.commit_rent(job); });
  return job.out;
}

void shuffler::synchronized::give_back(std::unique_lock<std::mutex>& lk, handle h) {
  impl::seal_job job{.h = h};
  bool sealed = false;
  transition(
      lk, [&] { return core.pin_for_return(job) == impl::pinned::work ? place(job.bytes) : work_at::nowhere; },
      [&] { core.seal_outside(job); },
      [&] {
        core.commit_return(job);
        sealed = true;
      });
  if (sealed) maybe_rotate(lk);
}

void shuffler::synchronized::maybe_rotate(std::unique_lock<std::mutex>& lk) noexcept {
  if (!core.rotation_due()) return;
  try {
    rotate(lk, nullptr, nullptr);
  } catch (...) {
    // Tried again after the next encryption.
  }
}

shuffler::rented shuffler::rent_bytes(handle h, std::size_t size, std::size_t alignment) {
  return s_->of(h).rent(h, size, alignment);
}

void shuffler::return_pointer(handle h) {
  synchronized& s = s_->of(h);
  auto lk = s.lock();
  s.give_back(lk, h);
}

void detail::end_lease(shuffler& owner, handle h) noexcept {
  try {
    owner.return_pointer(h);
  } catch (...) {
    // A lease always names a rented entry, and sealing needs no memory: the one failure
    // left is a call in a child of fork().
  }
}

void detail::free_when_returned(shuffler& owner, handle h) noexcept {
  if (owner.s_->forked()) return;
  auto* s = owner.s_->find(h);
  if (s == nullptr) return;
  std::lock_guard lk(s->m);
  s->core.free_when_returned(h);
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
  if (s_->forked()) return false;
  const synchronized* s = s_->find(h);
  if (s == nullptr) return false;
  std::lock_guard lk(s->m);
  const detail::entry* e = s->core.table.find(h);
  return e != nullptr && !e->free_on_return;
}

std::size_t shuffler::size_of(handle h) const {
  synchronized& s = s_->of(h);
  auto lk = s.lock();
  return s.core.find_live(h).size;
}

void shuffler::synchronized::shuffle_in_parts(std::unique_lock<std::mutex>& lk) {
  cv.wait(lk, [&] { return !core.full_active(); });
  core.begin_full();
  const struct wake {
    std::condition_variable& cv;
    ~wake() { cv.notify_all(); }
  } waiters{cv};
  lk.unlock();
  core.fault_in_plan();
  relock(lk);
  while (core.shuffle_part()) {
    lk.unlock();
    // The threads waiting for the lock go first (for a while: more keep coming).
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
    while (waiting.load(std::memory_order_relaxed) > 0 && std::chrono::steady_clock::now() < until)
      std::this_thread::yield();
    relock(lk);
  }
}

bool detail::full_shuffle_part(shuffler& owner, handle h) {
  shuffler::synchronized& s = owner.s_->of(h);
  auto lk = s.lock();
  // Destroyed before lk: a shuffle() waiting for this one wakes under the lock.
  const struct wake_when_ended {
    shuffler::synchronized& s;
    ~wake_when_ended() {
      if (!s.core.full_active()) s.cv.notify_all();
    }
  } wake{s};
  if (!s.core.full_active()) s.core.begin_full();
  return s.core.shuffle_part();
}

void shuffler::shuffle() {
  s_->check_fork();
  s_->each([](synchronized& s) {
    auto lk = s.lock();
    s.shuffle_in_parts(lk);
  });
}

void shuffler::shuffle(std::size_t budget) { s_->step(budget); }

void shuffler::set_shuffle_on_return(bool on) { s_->set_on_return(on); }

void shuffler::rotate_key() { s_->rotate(nullptr, nullptr); }

void shuffler::rotate_key(const key_type& key, const salt_type& salt) { s_->rotate(&key, &salt); }

shuffler_stats shuffler::stats() const { return s_->stats(); }

}  // namespace memshuffle
