#pragma once
// arena_resource: chunked bump allocation over an upstream resource. A drop-in for
// std::pmr::monotonic_buffer_resource (same constructors, release(), growth) that can
// also rewind: reset() and markers keep the chunks, so an arena reused per unit of
// work stops calling its upstream once it has grown to the work's size.
//
// Not synchronized, like std's monotonic resource: guard it yourself when shared.
// Errors: allocate() throws only what the upstream throws (a request too large to
// represent is passed on as an impossible one, as libstdc++ does), and bad_alignment
// (a std::bad_alloc) for an alignment that is not a power of two, as every memshuffle
// resource does. Bad
// options and bad markers throw std::invalid_argument. In every case the arena is left
// exactly as before the call.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory_resource>

#include <memshuffle/detail/marker_history.hpp>

namespace memshuffle {

/// The chunk sizes and extensions of an arena_resource.
///
/// The defaults reproduce libstdc++'s monotonic_buffer_resource: a first chunk of
/// 128 pointers' worth of bytes, each next chunk 1.5 times larger, no upper bound, and
/// deallocate() without effect. The rest are extensions, all off by default.
struct arena_options {
  std::size_t initial_size = 128 * sizeof(void*);  ///< usable bytes of the first chunk; > 0
  double growth_factor = 1.5;                       ///< >= 1 and finite
  /// Chunks stop growing here (>= initial_size); a larger single request still gets a
  /// chunk of its own.
  std::size_t max_chunk_size = std::numeric_limits<std::size_t>::max();
  /// deallocate() of the most recent block gives its bytes back, so the next allocation
  /// reuses them. Off: deallocate() has no effect, as the standard's.
  bool reuse_last_block = false;
  /// Zero the bytes handed out before they are reused or go back upstream: on
  /// release(), reset(), rewind(), the end of an arena_scope, a reused last block, and
  /// destruction.
  bool wipe = false;
  /// reset() keeps at most this many bytes of chunks (the largest that fit, in their
  /// order) and gives the rest back upstream; growth restarts from the largest kept.
  std::size_t reset_retention = std::numeric_limits<std::size_t>::max();
  /// Besides the cap, a policy from recent units (a unit: what is allocated between two
  /// resets): reset() keeps at most 1.25 times what the most demanding of the last
  /// `retention_window` units needed, this one included (its need: the chunk bytes it
  /// went through, from its first byte to its position at the reset). After a burst of
  /// large units the arena gives their chunks back once they have left the window.
  /// 0: off; at most max_retention_window.
  std::size_t retention_window = 0;
  static constexpr std::size_t max_retention_window = 32;  ///< the largest retention_window
};

/// The usage figures of an arena_resource, from stats().
struct arena_stats {
  std::size_t bytes_used = 0;       ///< requested bytes handed out, not yet rewound or popped
  std::size_t bytes_reserved = 0;   ///< bytes held from the upstream (the caller's buffer excluded)
  std::size_t chunks = 0;           ///< blocks held from the upstream
  std::size_t allocations = 0;      ///< allocations counted in bytes_used
  std::size_t peak_bytes_used = 0;  ///< highest bytes_used since construction
  std::size_t upstream_allocations = 0;  ///< calls to the upstream's allocate since construction
  /// The most the last reset() could keep: the smaller of reset_retention and, with a
  /// retention_window, 1.25 times the need of the window's most demanding unit;
  /// SIZE_MAX before any reset and without either.
  std::size_t retention_limit = std::numeric_limits<std::size_t>::max();
};

class arena_resource;

/// A position in an arena, from arena_resource::mark().
///
/// Valid for rewind() until the arena is reset or released, rewound to a marker taken
/// before it, or its position is given back by deallocating the most recent block.
/// Rewinding to it again, or to a marker taken before it, is fine; markers taken after
/// it are stale once it is rewound to.
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

/// Chunked bump allocation over an upstream resource: a drop-in for
/// std::pmr::monotonic_buffer_resource that can also rewind (reset(), mark() and
/// rewind(), arena_scope) and keep its chunks for reuse. Not synchronized.
class arena_resource : public std::pmr::memory_resource {
 public:
  // The six constructors of std::pmr::monotonic_buffer_resource, noexcept as
  // libstdc++'s. Their arguments are what both standard libraries accept.

  /// \effects As arena_resource(std::pmr::get_default_resource()).
  arena_resource() noexcept;
  /// \effects An empty arena over `upstream`; the first chunk is 128 pointers' worth of bytes.
  /// \requires `upstream` is not null (checked with debug_checks).
  explicit arena_resource(std::pmr::memory_resource* upstream) noexcept;
  /// \effects As arena_resource(initial_size, std::pmr::get_default_resource()).
  explicit arena_resource(std::size_t initial_size) noexcept;
  /// \effects An empty arena whose first chunk holds `initial_size` bytes (0 is taken as 1).
  /// \requires `upstream` is not null (checked with debug_checks).
  arena_resource(std::size_t initial_size, std::pmr::memory_resource* upstream) noexcept;
  /// \effects As arena_resource(buffer, buffer_size, std::pmr::get_default_resource()).
  arena_resource(void* buffer, std::size_t buffer_size) noexcept;
  /// \effects An arena that fills `buffer` first, then chunks from `upstream`, the first
  /// of them growth_factor times `buffer_size`. A null `buffer` is no buffer (as libc++):
  /// `buffer_size` then only sets the first chunk's size.
  /// \requires `upstream` is not null (checked with debug_checks); a non-null `buffer`
  /// has `buffer_size` writable bytes and outlives the arena.
  arena_resource(void* buffer, std::size_t buffer_size,
                 std::pmr::memory_resource* upstream) noexcept;
  /// \effects An empty arena over `upstream` with the given chunk sizes and extensions.
  /// \throws std::invalid_argument for a null `upstream` or options outside their ranges.
  explicit arena_resource(const arena_options& options,
                          std::pmr::memory_resource* upstream = std::pmr::get_default_resource());

  arena_resource(const arena_resource&) = delete;
  arena_resource& operator=(const arena_resource&) = delete;
  /// \effects release().
  ~arena_resource() override;

  /// \effects As std: gives every chunk back and returns to the state right after
  /// construction, the caller's buffer and the first chunk size included (LWG 3120).
  /// Wipes first with options().wipe.
  void release() noexcept;
  /// \effects Rewinds to empty and keeps the chunks for reuse, at most
  /// options().reset_retention bytes of them and, with options().retention_window, at
  /// most what the window's most demanding unit needed. Wipes first with options().wipe.
  void reset() noexcept;
  /// \effects Gives back the chunks that hold nothing after a reset() or rewind().
  void trim() noexcept;

  /// \returns The current position, for rewind().
  arena_marker mark() const noexcept;
  /// \effects Frees everything allocated since `m` was taken and keeps the chunks; wipes
  /// it first with options().wipe.
  /// \throws std::invalid_argument, changing nothing, for a marker from another arena or
  /// no longer valid.
  void rewind(const arena_marker& m);

  /// \returns The usage figures; peak_bytes_used includes the current use.
  arena_stats stats() const noexcept;
  /// \returns The upstream given at construction.
  std::pmr::memory_resource* upstream_resource() const noexcept { return upstream_; }
  /// \returns The options in force (those of the std constructors: the defaults, with
  /// initial_size set).
  const arena_options& options() const noexcept { return options_; }

 protected:
  // The common case is a bump within the current chunk, inline; the rest is in lib/.

  /// \effects Hands out `bytes` (distinct pointers for 0) at `alignment` from the
  /// current chunk, taking a new chunk from the upstream when it does not fit.
  /// \returns A block of at least `bytes` bytes aligned to `alignment`.
  /// \throws bad_alignment (a std::bad_alloc) for an alignment that is not a power of
  /// two; otherwise only what the upstream throws. Nothing changes when it throws.
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

  /// \effects None, as std; with options().reuse_last_block, gives the bytes back
  /// (wiped with options().wipe) when `p` is the most recent allocation.
  void do_deallocate(void* p, std::size_t bytes, std::size_t) override {
    if (reuse_last_block_) [[unlikely]]
      pop(p, bytes);
  }

  /// \returns Whether `other` is this very arena.
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override {
    return this == &other;
  }

 private:
  friend class arena_scope;
  struct chunk;  // the header at the end of each upstream block

  arena_resource(std::pmr::memory_resource* upstream, const arena_options& options) noexcept;
  void* allocate_slow(std::size_t bytes, std::size_t alignment);
  void* allocate_chunk(std::size_t bytes, std::size_t alignment);
  void pop(void* p, std::size_t bytes) noexcept;
  void wipe_from(const void* chunk, std::byte* position) noexcept;
  void retain(std::size_t cap) noexcept;
  std::size_t retention_limit() noexcept;
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
  bool reuse_last_block_ = false;

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
  std::size_t retention_limit_ = std::numeric_limits<std::size_t>::max();  // of the last reset()
  // The needs of the last units, a ring written by reset() with a retention_window.
  std::size_t recent_needs_[arena_options::max_retention_window] = {};
  std::size_t units_ = 0;
  std::uint64_t epoch_ = 0;  // bumped by reset() and release(): older markers are stale
  std::uint64_t base_ = 0;   // logical offset of begin_: the buffer at 0, chunks after it
  mutable detail::marker_history history_;  // mark() counts marks, hence mutable
};

/// Marks an arena when made and rewinds to the mark when it ends.
///
/// If its marker went stale meanwhile (a reset, a release, a rewind to an earlier
/// marker), it ends without touching the arena.
class arena_scope {
 public:
  /// \effects Marks `arena`. \requires `arena` outlives the scope.
  explicit arena_scope(arena_resource& arena) noexcept : arena_(arena), marker_(arena.mark()) {}
  arena_scope(const arena_scope&) = delete;
  arena_scope& operator=(const arena_scope&) = delete;
  /// \effects Rewinds the arena to the mark, if the mark is still valid.
  ~arena_scope() { arena_.try_rewind(marker_); }

  /// \returns The mark taken at construction.
  const arena_marker& marker() const noexcept { return marker_; }

 private:
  arena_resource& arena_;
  arena_marker marker_;
};

}  // namespace memshuffle
