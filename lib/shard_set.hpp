#pragma once
// The shards of a shuffler (shuffler_options::shards), as glibc's malloc has arenas: a
// thread allocates in the shard of its ordinal, every call on an entry goes to the
// shard whose handle tag the entry's handle carries, and each shard is a whole
// synchronized algorithm (shuffler_sync.hpp) with its own lock, handle table, heap and
// key ring. Threads that use their own entries so never meet on a lock or a cache line.
// A shard is made when a thread first allocates in it; shard 0 with the shuffler.
// Calls that span the shuffler (shuffle, rotate_key, stats) visit the shards made so
// far, one at a time (stats: all locked in index order, the one order any code takes
// two shard locks in).
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory_resource>
#include <mutex>
#include <optional>

#include "shuffler_sync.hpp"

namespace memshuffle {

namespace detail {

// Calls into a resource one at a time: the shards share the upstream and the
// plaintext_resource, which need not be thread safe (the shuffler called them under
// its one lock before it had shards). Arenas and windows are coarse, so the lock is
// taken rarely.
class serialized_resource final : public std::pmr::memory_resource {
 public:
  explicit serialized_resource(std::pmr::memory_resource* r) noexcept : r_(r) {}

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    const std::lock_guard lk(m_);
    return r_->allocate(bytes, alignment);
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    const std::lock_guard lk(m_);
    r_->deallocate(p, bytes, alignment);
  }
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

  std::pmr::memory_resource* r_;
  std::mutex m_;
};

}  // namespace detail

struct shuffler::shard_set {
  static constexpr std::size_t max_shards = 64;

  // o holds no key or salt: they come as pointers (shard 0's), and are kept, in secret
  // memory, only while later shards may need to derive theirs from them.
  shard_set(const shuffler_options& o, const key_type* key, const salt_type* salt, std::pmr::memory_resource* up);
  ~shard_set();
  shard_set(const shard_set&) = delete;
  shard_set& operator=(const shard_set&) = delete;

  bool forked() const noexcept { return detail::fork_epoch() != epoch; }
  void check_fork() const;

  // The calling thread's shard, made on first use; shard 0 when it cannot be made.
  // Throws fork_error in a child.
  synchronized& for_alloc();
  // The shard h names; null when h is of no shard of this shuffler.
  synchronized* find(handle h) const noexcept;
  // The shard h names; throws fork_error in a child (here, or when the shard is locked),
  // invalid_handle_error for a handle of no shard.
  synchronized& of(handle h) const;
  // f(shard) for every shard made so far, in index order.
  template <class F>
  void each(F&& f) const {
    for (std::size_t i = 0; i < count; ++i)
      if (synchronized* s = shards[i].load(std::memory_order_acquire)) f(*s);
  }

  // shuffle(budget): a step of the shard whose pass is under way, the next one's after.
  void step(std::size_t budget);
  // Every shard to a new key: random ones, or key and salt for shard 0 and keys derived
  // from them for the others (also for shards made later).
  void rotate(const key_type* key, const salt_type* salt);
  void set_on_return(bool on);
  shuffler_stats stats() const;

 private:
  // A shard's key and salt, kept in secret memory while later shards may need them.
  struct seed_block {
    key_type key;
    salt_type salt;
  };
  synchronized& make(std::size_t index);
  void drop_seed() noexcept;
  void keep_seed(const key_type& key, const salt_type& salt);

  const std::uint64_t epoch = detail::fork_epoch();
  const std::size_t count;
  shuffler_options opt;  // for the shards to make: no key, no salt
  detail::serialized_resource upstream;
  std::optional<detail::serialized_resource> windows;  // the caller's plaintext_resource

  // Read on every call: written once per shard, on lines of their own.
  alignas(64) std::array<std::atomic<synchronized*>, max_shards> shards{};
  std::array<std::atomic<std::uint16_t>, max_shards> tags{};

  alignas(64) mutable std::mutex make_m;  // making shards; the seed; opt.shuffle_on_return
  seed_block* seed = nullptr;             // in secret memory, or null (random keys)
  std::mutex step_m;                      // shuffle(budget)'s cursor
  std::size_t step_at = 0;

 public:
  shard_set* next_abandoned = nullptr;  // in a child of fork(): kept, never destroyed
};

}  // namespace memshuffle
