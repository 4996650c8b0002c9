#pragma once
// arena_resource: chunked bump allocation over an upstream resource. A drop-in for
// std::pmr::monotonic_buffer_resource (same constructors, release(), growth) that can
// also rewind: reset() and markers keep the chunks, so an arena reused per unit of
// work stops calling its upstream once it has grown to the work's size.
//
// Not synchronized, like std's monotonic resource: guard it yourself when shared.
// Errors: an alignment that is not a power of two throws memshuffle::type_error; bad
// constructor arguments and bad markers throw std::invalid_argument; a request whose
// size cannot be represented, or an upstream failure, throws std::bad_alloc. In every
// case the arena is left exactly as before the call.
#include <compare>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory_resource>

namespace memshuffle {

// The defaults reproduce libstdc++'s monotonic_buffer_resource: a first chunk of
// 128 pointers' worth of bytes, each next chunk 1.5 times larger, no upper bound.
struct arena_options {
  std::size_t initial_size = 128 * sizeof(void*);  // usable bytes of the first chunk; > 0
  double growth_factor = 1.5;                       // >= 1 and finite
  // Chunks stop growing here (>= initial_size); a larger single request still gets a
  // chunk of its own.
  std::size_t max_chunk_size = std::numeric_limits<std::size_t>::max();
};

struct arena_stats {
  std::size_t bytes_used = 0;       // requested bytes handed out, not yet rewound or popped
  std::size_t bytes_reserved = 0;   // bytes held from the upstream (the caller's buffer excluded)
  std::size_t chunks = 0;           // blocks held from the upstream
  std::size_t allocations = 0;      // allocations counted in bytes_used
  std::size_t peak_bytes_used = 0;  // highest bytes_used since construction
  std::size_t upstream_allocations = 0;  // calls to the upstream's allocate since construction
};

class arena_resource;

// A position in an arena, from mark(). Valid for rewind() until the arena is reset or
// released, rewound to a marker taken before it, or its position is given back by
// deallocating the most recent block. Rewinding to it again, or to a marker taken
// before it, is fine; markers taken after it are stale once it is rewound to.
class arena_marker {
 private:
  friend class arena_resource;
  const arena_resource* owner_ = nullptr;
  void* chunk_ = nullptr;
  std::byte* position_ = nullptr;
  std::size_t bytes_used_ = 0;
  std::size_t allocations_ = 0;
  std::uint64_t epoch_ = 0;
  std::uint64_t offset_ = 0;  // logical offset: orders positions across chunks
  std::uint64_t clock_ = 0;   // when it was taken, among marks
};

namespace detail {

// Tells stale markers from valid ones in constant space: the arena's position, as a
// logical offset, and the times it fell. A marker is valid while the position has not
// fallen below it since it was taken. Details in lib/arena_resource.cpp.
class marker_history {
 public:
  // A position with a tie-break: a rewind to marker m falls to (offset, m's clock), so
  // markers taken after m at the same offset are behind it; a pop falls to (offset, max).
  struct key {
    std::uint64_t offset;
    std::uint64_t tie;
    auto operator<=>(const key&) const = default;
  };

  // The new marker's clock.
  std::uint64_t mark(std::uint64_t offset) noexcept {
    ++clock_;
    highest_ = key{offset, clock_};
    return clock_;
  }
  void fall_to(key k) noexcept;
  bool valid(std::uint64_t clock, key k) const noexcept;
  void clear() noexcept {
    size_ = 0;
    highest_ = key{0, 0};
  }

 private:
  struct fall {
    std::uint64_t clock;  // the first mark clock it does not apply to
    key to;
  };
  static constexpr std::size_t capacity = 32;
  void merge() noexcept;

  std::uint64_t clock_ = 0;
  key highest_{0, 0};  // no valid marker is above it
  std::size_t size_ = 0;
  fall falls_[capacity];  // clocks and keys strictly increasing
};

}  // namespace detail

class arena_resource : public std::pmr::memory_resource {
 public:
  // The six constructors of std::pmr::monotonic_buffer_resource. Null upstream, zero
  // initial_size, or a null buffer with a nonzero size throw std::invalid_argument.
  arena_resource();
  explicit arena_resource(std::pmr::memory_resource* upstream);
  explicit arena_resource(std::size_t initial_size);
  arena_resource(std::size_t initial_size, std::pmr::memory_resource* upstream);
  arena_resource(void* buffer, std::size_t buffer_size);
  arena_resource(void* buffer, std::size_t buffer_size, std::pmr::memory_resource* upstream);
  // Bad options throw std::invalid_argument.
  explicit arena_resource(const arena_options& options,
                          std::pmr::memory_resource* upstream = std::pmr::get_default_resource());

  arena_resource(const arena_resource&) = delete;
  arena_resource& operator=(const arena_resource&) = delete;
  ~arena_resource() override;

  // As std: gives every chunk back and returns to the state right after construction,
  // the caller's buffer and the first chunk size included (LWG 3120).
  void release() noexcept;
  // Rewinds to empty and keeps every chunk for reuse.
  void reset() noexcept;
  // Gives back the chunks that hold nothing after a reset() or rewind().
  void trim() noexcept;

  arena_marker mark() const noexcept;
  // Frees everything allocated since m was taken; keeps the chunks. A marker from
  // another arena or no longer valid throws std::invalid_argument.
  void rewind(const arena_marker& m);

  arena_stats stats() const noexcept;
  std::pmr::memory_resource* upstream_resource() const noexcept { return upstream_; }

 protected:
  // The common case is a bump within the current chunk, inline; the rest is in lib/.
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    const std::size_t n = bytes + (bytes == 0);  // distinct pointers for zero bytes, as std
    const auto cur = reinterpret_cast<std::uintptr_t>(cur_);
    const auto end = reinterpret_cast<std::uintptr_t>(end_);
    const auto at = (cur + alignment - 1) & ~(alignment - 1);
    if (alignment != 0 && (alignment & (alignment - 1)) == 0 && at <= end && end - at >= n)
        [[likely]] {
      std::byte* p = cur_ + (at - cur);
      cur_ = p + n;
      used_ += bytes;
      ++allocations_;
      return p;
    }
    return allocate_slow(bytes, alignment);
  }

  // Gives the bytes back when p is the most recent allocation; otherwise nothing.
  void do_deallocate(void* p, std::size_t bytes, std::size_t) override {
    const std::size_t n = bytes + (bytes == 0);
    const auto at = reinterpret_cast<std::uintptr_t>(p);
    if (at + n == reinterpret_cast<std::uintptr_t>(cur_) &&
        at >= reinterpret_cast<std::uintptr_t>(begin_) && bytes <= used_ && allocations_ > 0) {
      note_peak();
      cur_ = static_cast<std::byte*>(p);
      used_ -= bytes;
      --allocations_;
      note_pop();
    }
  }

  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override {
    return this == &other;
  }

 private:
  friend class arena_scope;
  struct chunk;  // the header at the end of each upstream block

  void* allocate_slow(std::size_t bytes, std::size_t alignment);
  bool try_rewind(const arena_marker& m) noexcept;
  void enter(chunk* c, std::uint64_t base) noexcept;
  void free_chunks(chunk* first) noexcept;
  void note_pop() noexcept;  // out of line: the bump paths stay small
  void note_peak() noexcept {
    if (used_ > peak_) peak_ = used_;
  }

  // The bump region: [begin_, end_) of the current chunk (or the caller's buffer),
  // cur_ the first free byte. The two counters are kept apart on purpose: side by
  // side, gcc merges their updates into one 16-byte read-modify-write, which made
  // the bump 20% slower than std's.
  std::byte* cur_ = nullptr;
  std::byte* end_ = nullptr;
  std::size_t used_ = 0;
  std::byte* begin_ = nullptr;
  std::size_t allocations_ = 0;

  // Chunks in the order they are filled; those after current_ are spares kept by
  // reset() and rewind(). current_ == nullptr: the caller's buffer is being filled.
  chunk* first_ = nullptr;
  chunk* current_ = nullptr;

  std::pmr::memory_resource* upstream_;
  arena_options options_;
  std::byte* buffer_ = nullptr;
  std::size_t buffer_size_ = 0;
  std::size_t first_chunk_size_;  // what release() restores next_chunk_size_ to
  std::size_t next_chunk_size_;
  std::size_t reserved_ = 0;
  std::size_t chunks_ = 0;
  std::size_t peak_ = 0;
  std::size_t upstream_allocations_ = 0;
  std::uint64_t epoch_ = 0;  // bumped by reset() and release(): older markers are stale
  std::uint64_t base_ = 0;   // logical offset of begin_: the buffer at 0, chunks after it
  mutable detail::marker_history history_;  // mark() counts marks, hence mutable
};

// Marks the arena when made and rewinds to the mark when it ends. If its marker went
// stale meanwhile (a reset, a release, a rewind to an earlier marker), it ends without
// touching the arena.
class arena_scope {
 public:
  explicit arena_scope(arena_resource& arena) noexcept : arena_(arena), marker_(arena.mark()) {}
  arena_scope(const arena_scope&) = delete;
  arena_scope& operator=(const arena_scope&) = delete;
  ~arena_scope() { arena_.try_rewind(marker_); }

  const arena_marker& marker() const noexcept { return marker_; }

 private:
  arena_resource& arena_;
  arena_marker marker_;
};

}  // namespace memshuffle
