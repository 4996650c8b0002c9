// The slow paths of arena_resource: chunks, growth, markers. The bump itself is
// inline in the header.
#include <memshuffle/arena_resource.hpp>

#include <memshuffle/detail/assert.hpp>
#include <memshuffle/error.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <new>
#include <stdexcept>
#include <string>

namespace memshuffle {

// Kept in the last bytes of each upstream block, like libstdc++'s, so the block's
// start keeps the upstream alignment and a chunk costs what std's costs (16 bytes).
// The block size is a multiple of 64, which leaves its low bits for log2(alignment).
struct arena_resource::chunk {
  chunk* next;
  std::size_t size_and_log_align;

  std::size_t block_size() const noexcept { return size_and_log_align & ~std::size_t{63}; }
  std::size_t block_align() const noexcept { return std::size_t{1} << (size_and_log_align & 63); }
  std::byte* begin() noexcept {
    return reinterpret_cast<std::byte*>(this) + sizeof(chunk) - block_size();
  }
  std::byte* end() noexcept { return reinterpret_cast<std::byte*>(this); }
};

namespace {

constexpr std::size_t block_granule = 64;

std::pmr::memory_resource* checked(std::pmr::memory_resource* upstream) {
  if (upstream == nullptr) throw std::invalid_argument("arena_resource: null upstream resource");
  return upstream;
}

const arena_options& checked(const arena_options& o) {
  if (o.initial_size == 0) throw std::invalid_argument("arena_resource: initial_size is 0");
  if (!std::isfinite(o.growth_factor) || o.growth_factor < 1.0)
    throw std::invalid_argument("arena_resource: growth_factor must be finite and >= 1");
  if (o.max_chunk_size < o.initial_size)
    throw std::invalid_argument("arena_resource: max_chunk_size is smaller than initial_size");
  if (o.retention_window > arena_options::max_retention_window)
    throw std::invalid_argument("arena_resource: retention_window is above max_retention_window");
  return o;
}

// next * factor, saturating at the cap.
std::size_t grown(std::size_t next, double factor, std::size_t cap) {
  const double g = static_cast<double>(next) * factor;
  if (g >= static_cast<double>(cap)) return cap;
  return std::max(next, static_cast<std::size_t>(g));
}

// The options the std constructors stand for. Their arguments are not checked beyond
// what libstdc++ checks: an initial size of 0 is taken as 1, as libc++ does.
arena_options std_options(std::size_t initial_size) noexcept {
  arena_options o;
  o.initial_size = std::max<std::size_t>(initial_size, 1);
  return o;
}

}  // namespace

arena_resource::arena_resource(std::pmr::memory_resource* upstream,
                               const arena_options& options) noexcept
    : reuse_last_block_(options.reuse_last_block),
      upstream_(upstream),
      options_(options),
      first_chunk_size_(options.initial_size),
      next_chunk_size_(options.initial_size) {
  MEMSHUFFLE_ASSERT(upstream != nullptr, "arena_resource: null upstream resource");
}

arena_resource::arena_resource() noexcept : arena_resource(std::pmr::get_default_resource()) {}

arena_resource::arena_resource(std::pmr::memory_resource* upstream) noexcept
    : arena_resource(upstream, arena_options{}) {}

arena_resource::arena_resource(std::size_t initial_size) noexcept
    : arena_resource(initial_size, std::pmr::get_default_resource()) {}

arena_resource::arena_resource(std::size_t initial_size,
                               std::pmr::memory_resource* upstream) noexcept
    : arena_resource(upstream, std_options(initial_size)) {}

arena_resource::arena_resource(void* buffer, std::size_t buffer_size) noexcept
    : arena_resource(buffer, buffer_size, std::pmr::get_default_resource()) {}

// As std: the first chunk after the buffer is growth_factor times the buffer's size.
// A null buffer holds nothing, but its size still sets the first chunk's, as in libc++.
arena_resource::arena_resource(void* buffer, std::size_t buffer_size,
                               std::pmr::memory_resource* upstream) noexcept
    : arena_resource(upstream, arena_options{}) {
  if (buffer != nullptr) {
    buffer_ = static_cast<std::byte*>(buffer);
    buffer_size_ = buffer_size;
  }
  first_chunk_size_ = next_chunk_size_ =
      grown(std::max<std::size_t>(buffer_size, 1), options_.growth_factor, options_.max_chunk_size);
  begin_ = cur_ = buffer_;
  end_ = buffer_ + buffer_size_;
}

arena_resource::arena_resource(const arena_options& options, std::pmr::memory_resource* upstream)
    : arena_resource(checked(upstream), checked(options)) {}

arena_resource::~arena_resource() {
  if (options_.wipe) wipe_from(nullptr, buffer_);
  free_chunks(first_);
}

void arena_resource::free_chunks(chunk* c) noexcept {
  while (c != nullptr) {
    chunk* next = c->next;
    const std::size_t size = c->block_size();
    reserved_ -= size;
    --chunks_;
    upstream_->deallocate(c->begin(), size, c->block_align());
    c = next;
  }
}

void arena_resource::enter(chunk* c, std::uint64_t base) noexcept {
  current_ = c;
  base_ = base;
  if (c == nullptr) {
    begin_ = cur_ = buffer_;
    end_ = buffer_ + buffer_size_;
  } else {
    begin_ = cur_ = c->begin();
    end_ = c->end();
  }
}

// Zeroes from `position` in region `from` (a chunk, or null for the caller's buffer)
// up to the current position. Regions are filled in list order, so every region in
// between was passed through; their tails past the last block are zeroed too.
void arena_resource::wipe_from(const void* from, std::byte* position) noexcept {
  auto* c = static_cast<chunk*>(const_cast<void*>(from));
  std::byte* p = position;
  while (c != current_) {
    std::byte* end = c == nullptr ? buffer_ + buffer_size_ : c->end();
    secure_wipe(p, static_cast<std::size_t>(end - p));
    c = c == nullptr ? first_ : c->next;
    p = c->begin();
  }
  secure_wipe(p, static_cast<std::size_t>(cur_ - p));
}

void arena_resource::release() noexcept {
  note_peak();
  if (options_.wipe) wipe_from(nullptr, buffer_);
  free_chunks(first_);
  first_ = nullptr;
  enter(nullptr, 0);
  next_chunk_size_ = first_chunk_size_;
  used_ = allocations_ = 0;
  units_ = 0;
  retention_limit_ = std::numeric_limits<std::size_t>::max();
  ++epoch_;
  history_.clear();
}

void arena_resource::reset() noexcept {
  note_peak();
  if (options_.wipe) wipe_from(nullptr, buffer_);
  retention_limit_ = retention_limit();
  if (retention_limit_ != std::numeric_limits<std::size_t>::max()) retain(retention_limit_);
  enter(nullptr, 0);
  used_ = allocations_ = 0;
  ++epoch_;
  history_.clear();
}

// Keeps the largest chunks whose sizes add up to at most cap, largest first, and gives
// the rest back. Growth restarts after the largest kept chunk, so a unit larger than
// the cap does not leave ever larger chunks behind.
void arena_resource::retain(std::size_t cap) noexcept {
  chunk* kept = nullptr;
  chunk** tail = &kept;
  std::size_t room = cap;
  for (;;) {
    chunk** best = nullptr;
    for (chunk** c = &first_; *c != nullptr; c = &(*c)->next)
      if ((*c)->block_size() <= room && (best == nullptr || (*c)->block_size() > (*best)->block_size()))
        best = c;
    if (best == nullptr) break;
    chunk* b = *best;
    *best = b->next;
    room -= b->block_size();
    b->next = nullptr;
    *tail = b;
    tail = &b->next;
  }
  free_chunks(first_);
  first_ = kept;
  current_ = nullptr;
  next_chunk_size_ =
      kept == nullptr
          ? first_chunk_size_
          : grown(std::max(first_chunk_size_, kept->block_size() - sizeof(chunk)),
                  options_.growth_factor, options_.max_chunk_size);
}

// The smaller of the fixed cap and the window's largest need, plus a quarter for the
// tails of chunks a like unit passes over; this unit's need (the chunk bytes it went
// through: its logical position past the caller's buffer) enters the window first.
std::size_t arena_resource::retention_limit() noexcept {
  const std::size_t window = options_.retention_window;
  if (window == 0) return options_.reset_retention;
  const std::size_t need =
      current_ == nullptr ? 0 : static_cast<std::size_t>(base_ - buffer_size_) + static_cast<std::size_t>(cur_ - begin_);
  recent_needs_[units_++ % window] = need;
  const std::size_t most = *std::max_element(recent_needs_, recent_needs_ + std::min(units_, window));
  const std::size_t slack = std::min(most / 4, std::numeric_limits<std::size_t>::max() - most);
  return std::min(options_.reset_retention, most + slack);
}

void arena_resource::trim() noexcept {
  chunk*& spares = current_ != nullptr ? current_->next : first_;
  free_chunks(spares);
  spares = nullptr;
}

void arena_resource::pop(void* p, std::size_t bytes) noexcept {
  const std::size_t n = bytes + (bytes == 0);
  const auto at = reinterpret_cast<std::uintptr_t>(p);
  if (at + n == reinterpret_cast<std::uintptr_t>(cur_) &&
      at >= reinterpret_cast<std::uintptr_t>(begin_) && bytes <= used_ && allocations_ > 0) {
    note_peak();
    if (options_.wipe) secure_wipe(p, n);
    cur_ = static_cast<std::byte*>(p);
    used_ -= bytes;
    --allocations_;
    note_pop();
  }
}

void* arena_resource::allocate_slow(std::size_t bytes, std::size_t alignment) {
  if (!std::has_single_bit(alignment)) throw bad_alignment();
  const std::size_t n = bytes + (bytes == 0);
  const auto fits = [&](chunk* c) {
    const auto b = reinterpret_cast<std::uintptr_t>(c->begin());
    const auto e = reinterpret_cast<std::uintptr_t>(c->end());
    const auto at = (b + alignment - 1) & ~(alignment - 1);
    return at >= b && at <= e && e - at >= n;
  };

  // The next region starts, logically, where this one ends.
  const std::uint64_t base = base_ + static_cast<std::uint64_t>(end_ - begin_);
  chunk* spare = current_ != nullptr ? current_->next : first_;
  if (spare != nullptr && fits(spare))
    enter(spare, base);
  else
    enter(static_cast<chunk*>(allocate_chunk(n, alignment)), base);
  // The region now fits the request: the bump cannot fail.
  return arena_resource::do_allocate(bytes, alignment);
}

// A fresh block, aligned for the request so it fits at the block's start, linked in
// after the current region. Nothing changes before the upstream call succeeds.
void* arena_resource::allocate_chunk(std::size_t n, std::size_t alignment) {
  const std::size_t block_align = std::max(alignment, alignof(std::max_align_t));
  const std::size_t want = std::max(n, next_chunk_size_);
  constexpr std::size_t limit = std::numeric_limits<std::size_t>::max();
  if (want > limit - sizeof(chunk) - (block_granule - 1)) {
    // Not representable: as libstdc++, ask the upstream for the impossible, so the
    // caller sees the upstream's own exception.
    void* p = upstream_->allocate(want, block_align);
    upstream_->deallocate(p, want, block_align);
    throw std::bad_alloc();
  }
  const std::size_t size = (want + sizeof(chunk) + block_granule - 1) & ~(block_granule - 1);
  auto* block = static_cast<std::byte*>(upstream_->allocate(size, block_align));
  chunk*& link = current_ != nullptr ? current_->next : first_;
  auto* c = ::new (block + size - sizeof(chunk))
      chunk{link, size | static_cast<std::size_t>(std::countr_zero(block_align))};
  link = c;
  reserved_ += size;
  ++chunks_;
  ++upstream_allocations_;
  next_chunk_size_ = grown(next_chunk_size_, options_.growth_factor, options_.max_chunk_size);
  return c;
}

arena_marker arena_resource::mark() const noexcept {
  arena_marker m;
  m.owner_ = this;
  m.chunk_ = current_;
  m.position_ = cur_;
  m.bytes_used_ = used_;
  m.allocations_ = allocations_;
  m.epoch_ = epoch_;
  m.offset_ = base_ + static_cast<std::uint64_t>(cur_ - begin_);
  m.clock_ = history_.mark(m.offset_);
  return m;
}

void arena_resource::note_pop() noexcept {
  history_.fall_to({base_ + static_cast<std::uint64_t>(cur_ - begin_),
                    std::numeric_limits<std::uint64_t>::max()});
}

// Only the history decides: a valid marker's chunk is still in the list at or before
// the current one (chunks are left backwards only by falls, and trim() frees only
// chunks after the current one), so its pointers are used only once it has passed.
bool arena_resource::try_rewind(const arena_marker& m) noexcept {
  if (m.owner_ != this || m.epoch_ != epoch_) return false;
  const detail::marker_history::key at{m.offset_, m.clock_};
  if (!history_.valid(m.clock_, at)) return false;
  note_peak();
  if (options_.wipe) wipe_from(m.chunk_, m.position_);
  auto* target = static_cast<chunk*>(m.chunk_);
  enter(target, 0);
  base_ = m.offset_ - static_cast<std::uint64_t>(m.position_ - begin_);
  cur_ = m.position_;
  used_ = m.bytes_used_;
  allocations_ = m.allocations_;
  history_.fall_to(at);
  return true;
}

void arena_resource::rewind(const arena_marker& m) {
  if (!try_rewind(m))
    throw std::invalid_argument(
        "arena_resource: marker from another arena, or stale (taken before a reset, a release, "
        "a rewind to an earlier marker, or the pop of a block allocated before it)");
}

arena_stats arena_resource::stats() const noexcept {
  return arena_stats{.bytes_used = used_,
                     .bytes_reserved = reserved_,
                     .chunks = chunks_,
                     .allocations = allocations_,
                     .peak_bytes_used = std::max(peak_, used_),
                     .upstream_allocations = upstream_allocations_,
                     .retention_limit = retention_limit_};
}

}  // namespace memshuffle
