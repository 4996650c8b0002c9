#include <memshuffle/secret_pool_resource.hpp>

#include <memshuffle/detail/assert.hpp>
#include <memshuffle/error.hpp>
#include <memshuffle/secure_wipe.hpp>

#include "fork_epoch.hpp"
#include "secret_pages.hpp"

#include <pthread.h>
#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace memshuffle {

namespace {

using detail::page_span;

constexpr std::size_t class_count = 8;   // 8, 16, ..., 1024

std::uintptr_t address(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// The size class serving bytes at alignment, or class_count for pages of their own.
std::size_t class_of(std::size_t bytes, std::size_t alignment) noexcept {
  const std::size_t size = std::max({bytes, alignment, secret_pool_resource::smallest_class});
  if (size > secret_pool_resource::largest_class) return class_count;
  return static_cast<std::size_t>(std::bit_width(std::bit_ceil(size) - 1)) - 3;
}

std::size_t class_size(std::size_t c) noexcept { return std::size_t{8} << c; }

// std::has_single_bit becomes a library call to popcount without -mpopcnt.
bool power_of_two(std::size_t x) noexcept { return x != 0 && (x & (x - 1)) == 0; }

// A sixteenth of the lock budget, so that several size classes fit under a small one.
std::size_t run_pages_for(const secret_pool_options& o) noexcept {
  if (o.run_pages != 0) return o.run_pages;
  rlimit limit{};
  if (::getrlimit(RLIMIT_MEMLOCK, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return 16;
  return std::clamp<std::size_t>(limit.rlim_cur / 16 / detail::page_size(), 1, 16);
}

struct run {
  page_span span;
  std::size_t cls = 0;
  std::size_t capacity = 0;
  std::size_t live = 0;
  std::vector<std::uint64_t> used;   // one bit per block
};

struct large_block {
  page_span span;
  std::size_t bytes = 0;
  std::size_t alignment = 0;
};

}  // namespace

struct secret_pool_resource::state {
  std::mutex m;
  secret_backend backend = secret_backend::locked_pages;   // resolved
  std::uint64_t epoch = detail::fork_epoch();
  std::map<std::uintptr_t, std::unique_ptr<run>> runs;     // by first data byte
  std::array<std::vector<run*>, class_count> partial;      // runs with a free block
  std::array<run*, class_count> spare{};   // the one empty run kept per class, still listed
  std::map<std::uintptr_t, large_block> large;             // by the pointer handed out
  // Emptied large spans kept (wiped) for the next block of the same size: a plaintext
  // window of a few KiB is rented and returned far more often than a kernel call
  // (mmap, mlock, memfd_secret) can afford. Given back whenever a map is refused.
  static constexpr std::size_t spare_large_limit = 4;
  std::vector<page_span> spare_large;
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> forked;   // [begin, end) of a parent
  secret_memory_report report;
  secret_pool_stats stats;
  std::size_t unlocked_spans = 0;

  void account(const page_span& s, int sign);
  page_span map(std::size_t usable, on_lock_refused policy);
  void unmap(const page_span& s);
  void leave_parent();
  void* take(std::size_t c, const secret_pool_options& o);
  run* grow(std::size_t c, const secret_pool_options& o);
  run* find_run(std::uintptr_t a, std::size_t c) const;
  bool give(std::uintptr_t a, std::size_t c);
  void drop(run* r);
  void* take_large(std::size_t bytes, std::size_t alignment, on_lock_refused policy);
  page_span large_span(std::size_t usable, on_lock_refused policy);
  void drop_spare_large() noexcept;
  bool give_large(std::uintptr_t a, std::size_t bytes, std::size_t alignment);
  bool from_parent(std::uintptr_t a) const;
};

void secret_pool_resource::state::account(const page_span& s, int sign) {
  const auto apply = [sign](std::size_t& v, std::size_t n) { v = sign > 0 ? v + n : v - n; };
  apply(stats.bytes_mapped, s.reserved);
  if (s.locked) apply(stats.bytes_locked, s.usable);
  else apply(unlocked_spans, 1);
}

page_span secret_pool_resource::state::map(std::size_t usable, on_lock_refused policy) {
  page_span s = detail::map_secret_pages(usable, backend, policy);
  if (!s.locked) {
    ++report.lock_refusals;
    report.degraded = true;
  }
  account(s, +1);
  return s;
}

void secret_pool_resource::state::unmap(const page_span& s) {
  account(s, -1);
  detail::unmap_secret_pages(s);
}

// First call in a child of fork(): the parent's pages are gone or zero here. Keep their
// addresses reserved, so stale frees are recognised, and start over with fresh runs.
void secret_pool_resource::state::leave_parent() {
  // Called from deallocate and the destructor, which must not throw: without room to
  // record the ranges, stale frees are merely counted as bad ones (still harmless).
  bool record = true;
  try {
    forked.reserve(forked.size() + runs.size() + large.size());
  } catch (const std::bad_alloc&) {
    record = false;
  }
  const auto abandon = [this, record](const page_span& s) {
    detail::abandon_secret_pages(s);
    if (record) forked.emplace_back(address(s.data), address(s.data) + s.usable);
  };
  for (auto& [a, r] : runs) abandon(r->span);
  for (auto& [a, b] : large) abandon(b.span);
  for (auto& b : spare_large) abandon(b);
  runs.clear();
  large.clear();
  spare_large.clear();
  for (auto& p : partial) p.clear();
  spare.fill(nullptr);
  const std::size_t bad = stats.bad_deallocations, total = stats.total_allocations;
  stats = secret_pool_stats{};
  stats.bad_deallocations = bad;
  stats.total_allocations = total;
  unlocked_spans = 0;
  epoch = detail::fork_epoch();
}

bool secret_pool_resource::state::from_parent(std::uintptr_t a) const {
  return std::any_of(forked.begin(), forked.end(),
                     [a](const auto& r) { return r.first <= a && a < r.second; });
}

run* secret_pool_resource::state::grow(std::size_t c, const secret_pool_options& o) {
  auto r = std::make_unique<run>();
  r->cls = c;
  const std::size_t bytes = run_pages_for(o) * detail::page_size();
  r->capacity = bytes / class_size(c);
  r->used.assign((r->capacity + 63) / 64, 0);
  r->span = map(bytes, o.lock_refused);
  run* raw = r.get();
  try {
    runs.emplace(address(raw->span.data), std::move(r));
  } catch (...) {
    unmap(raw->span);
    throw;
  }
  ++stats.runs;
  return raw;
}

void* secret_pool_resource::state::take(std::size_t c, const secret_pool_options& o) {
  auto& list = partial[c];
  if (list.empty()) {
    // Room for every run of the class, so the push_back of a free never throws.
    list.reserve(runs.size() + 1);
    list.push_back(grow(c, o));
  }
  run* r = list.back();
  if (r == spare[c]) spare[c] = nullptr;
  std::size_t word = 0;
  while (r->used[word] == ~std::uint64_t{0}) ++word;
  const auto bit = static_cast<std::size_t>(std::countr_one(r->used[word]));
  r->used[word] |= std::uint64_t{1} << bit;
  if (++r->live == r->capacity) list.pop_back();
  ++stats.blocks;
  return r->span.data + ((word * 64 + bit) << (c + 3));
}

// An emptied run stays listed as its class's spare, or is given back if there is one.
void secret_pool_resource::state::drop(run* r) {
  if (spare[r->cls] == nullptr) {
    spare[r->cls] = r;
    return;
  }
  auto& list = partial[r->cls];
  list.erase(std::find(list.begin(), list.end(), r));
  unmap(r->span);
  --stats.runs;
  runs.erase(address(r->span.data));
}

// The run holding a, if any: the run last handed from, else a lookup by address.
run* secret_pool_resource::state::find_run(std::uintptr_t a, std::size_t c) const {
  const run* last = partial[c].empty() ? nullptr : partial[c].back();
  if (last != nullptr && a - address(last->span.data) < last->span.usable) return const_cast<run*>(last);
  auto it = runs.upper_bound(a);
  return it == runs.begin() ? nullptr : std::prev(it)->second.get();
}

// Frees the block at a of class c. False when a is no live block of class c.
bool secret_pool_resource::state::give(std::uintptr_t a, std::size_t c) {
  run* r = find_run(a, c);
  if (r == nullptr) return false;
  const std::uintptr_t offset = a - address(r->span.data);
  if (offset >= r->span.usable || r->cls != c || (offset & (class_size(c) - 1)) != 0) return false;
  const std::size_t index = offset >> (c + 3);   // offset / class_size(c), without a division
  const std::uint64_t mask = std::uint64_t{1} << (index % 64);
  if ((r->used[index / 64] & mask) == 0) return false;
  secure_wipe(reinterpret_cast<void*>(a), class_size(c));
  r->used[index / 64] &= ~mask;
  if (r->live-- == r->capacity) partial[c].push_back(r);   // room reserved in take()
  --stats.blocks;
  if (r->live == 0) drop(r);
  return true;
}

void* secret_pool_resource::state::take_large(std::size_t bytes, std::size_t alignment,
                                               on_lock_refused policy) {
  const std::size_t page = detail::page_size();
  if (bytes > SIZE_MAX / 2) throw std::bad_alloc();
  page_span s = large_span((bytes + page - 1) / page * page, policy);
  // The end of the block abuts the trailing guard page, as in secure_page_resource.
  const std::uintptr_t end = address(s.data) + s.usable;
  const std::uintptr_t p = (end - bytes) & ~(std::uintptr_t{alignment} - 1);
  try {
    large.emplace(p, large_block{s, bytes, alignment});
  } catch (...) {
    unmap(s);
    throw;
  }
  ++stats.large_allocations;
  return reinterpret_cast<void*>(p);
}

bool secret_pool_resource::state::give_large(std::uintptr_t a, std::size_t bytes,
                                              std::size_t alignment) {
  auto it = large.find(a);
  if (it == large.end() || it->second.bytes != std::max<std::size_t>(bytes, 1) ||
      it->second.alignment != alignment)
    return false;
  const page_span span = it->second.span;
  large.erase(it);
  --stats.large_allocations;
  secure_wipe(span.data, span.usable);
  if (spare_large.size() < spare_large_limit) {
    spare_large.push_back(span);  // room reserved when the span was taken
    stats.spare_large_bytes += span.reserved;
  } else {
    unmap(span);
  }
  return true;
}

page_span secret_pool_resource::state::large_span(std::size_t usable, on_lock_refused policy) {
  for (std::size_t i = 0; i < spare_large.size(); ++i) {
    if (spare_large[i].usable != usable) continue;
    const page_span s = spare_large[i];
    spare_large[i] = spare_large.back();
    spare_large.pop_back();
    stats.spare_large_bytes -= s.reserved;
    return s;
  }
  // Room for the span when it comes back, so give_large never allocates.
  spare_large.reserve(spare_large_limit);
  try {
    return map(usable, policy);
  } catch (const std::bad_alloc&) {
    if (spare_large.empty()) throw;
    drop_spare_large();  // their lock budget may be what was refused
    return map(usable, policy);
  }
}

void secret_pool_resource::state::drop_spare_large() noexcept {
  for (const page_span& s : spare_large) unmap(s);
  spare_large.clear();
  stats.spare_large_bytes = 0;
}

secret_pool_resource::secret_pool_resource() : secret_pool_resource(secret_pool_options{}) {}

secret_pool_resource::secret_pool_resource(secret_pool_options options)
    : options_(options), state_(std::make_unique<state>()) {
  if (options.run_pages > 1024)
    throw std::invalid_argument("memshuffle::secret_pool_resource: run_pages " +
                                std::to_string(options.run_pages) + " is above 1024");
  const bool secret = detail::secret_memory_supported();
  if (options.backend == secret_backend::secret_memory && !secret)
    throw secret_memory_refused("memshuffle: secret memory (memfd_secret) is not available");
  auto& r = state_->report;
  r.backend = options.backend == secret_backend::locked_pages || !secret
                  ? secret_backend::locked_pages
                  : secret_backend::secret_memory;
  r.in_fork_child = r.backend == secret_backend::secret_memory ? fork_behaviour::absent
                                                               : fork_behaviour::zeroed;
  r.fallbacks = options.backend == secret_backend::automatic && !secret ? 1 : 0;
  r.degraded = r.fallbacks != 0;
  state_->backend = r.backend;
}

secret_pool_resource::~secret_pool_resource() {
  auto& s = *state_;
  if (s.epoch != detail::fork_epoch()) s.leave_parent();
  for (auto& [a, r] : s.runs) detail::unmap_secret_pages(r->span);
  for (auto& [a, b] : s.large) detail::unmap_secret_pages(b.span);
  for (auto& b : s.spare_large) detail::unmap_secret_pages(b);
}

const secret_pool_options& secret_pool_resource::options() const noexcept { return options_; }

secret_memory_report secret_pool_resource::report() const {
  std::lock_guard lock(state_->m);
  secret_memory_report r = state_->report;
  r.locked = state_->unlocked_spans == 0;
  return r;
}

secret_pool_stats secret_pool_resource::stats() const {
  std::lock_guard lock(state_->m);
  return state_->stats;
}

void* secret_pool_resource::do_allocate(std::size_t bytes, std::size_t alignment) {
  if (!power_of_two(alignment) || alignment > detail::page_size()) throw bad_alignment();
  auto& s = *state_;
  std::lock_guard lock(s.m);
  if (s.epoch != detail::fork_epoch()) s.leave_parent();
  const std::size_t c = class_of(bytes, alignment);
  void* p = c == class_count ? s.take_large(std::max<std::size_t>(bytes, 1), alignment,
                                            options_.lock_refused)
                             : s.take(c, options_);
  ++s.stats.total_allocations;
  return p;
}

void secret_pool_resource::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) {
  auto& s = *state_;
  std::lock_guard lock(s.m);
  if (s.epoch != detail::fork_epoch()) s.leave_parent();
  const std::uintptr_t a = address(p);
  if (s.from_parent(a)) {
    ++s.stats.forked_blocks;
    return;
  }
  const std::size_t c = power_of_two(alignment) ? class_of(bytes, alignment) : class_count;
  const bool ok = c == class_count ? s.give_large(a, bytes, alignment) : s.give(a, c);
  if (!ok) ++s.stats.bad_deallocations;
  MEMSHUFFLE_ASSERT(ok, "secret_pool_resource: deallocate of a pointer that is not a live "
                        "block of that size and alignment");
}

bool secret_pool_resource::do_is_equal(const std::pmr::memory_resource& other) const noexcept {
  return this == &other;
}

namespace {

// Its lock is held across fork(), so a child never inherits it locked by a thread that
// does not exist there.
std::mutex* process_pool_lock = nullptr;

}  // namespace

void secret_pool_resource::lock_for_fork() noexcept { process_pool_lock->lock(); }
void secret_pool_resource::unlock_after_fork() noexcept { process_pool_lock->unlock(); }

secret_pool_resource& default_secret_pool() noexcept {
  // Constructed in place and never destroyed (as std::pmr::new_delete_resource()).
  alignas(secret_pool_resource) static unsigned char storage[sizeof(secret_pool_resource)];
  static secret_pool_resource* const pool = [] {
    auto* p = ::new (storage) secret_pool_resource();
    process_pool_lock = &p->state_->m;
    ::pthread_atfork(&secret_pool_resource::lock_for_fork, &secret_pool_resource::unlock_after_fork,
                     &secret_pool_resource::unlock_after_fork);
    return p;
  }();
  return *pool;
}

}  // namespace memshuffle
