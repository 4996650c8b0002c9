// The slow paths of arena_resource: chunks, growth, markers. The bump itself is
// inline in the header.
#include <memshuffle/arena_resource.hpp>

#include <memshuffle/error.hpp>

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
  return o;
}

// next * factor, saturating at the cap.
std::size_t grown(std::size_t next, double factor, std::size_t cap) {
  const double g = static_cast<double>(next) * factor;
  if (g >= static_cast<double>(cap)) return cap;
  return std::max(next, static_cast<std::size_t>(g));
}

}  // namespace

arena_resource::arena_resource() : arena_resource(std::pmr::get_default_resource()) {}

arena_resource::arena_resource(std::pmr::memory_resource* upstream)
    : arena_resource(arena_options{}, upstream) {}

arena_resource::arena_resource(std::size_t initial_size)
    : arena_resource(initial_size, std::pmr::get_default_resource()) {}

arena_resource::arena_resource(std::size_t initial_size, std::pmr::memory_resource* upstream)
    : arena_resource(arena_options{.initial_size = initial_size}, upstream) {}

arena_resource::arena_resource(void* buffer, std::size_t buffer_size)
    : arena_resource(buffer, buffer_size, std::pmr::get_default_resource()) {}

// As std: the first chunk after the buffer is growth_factor times the buffer's size.
arena_resource::arena_resource(void* buffer, std::size_t buffer_size,
                               std::pmr::memory_resource* upstream)
    : arena_resource(arena_options{}, upstream) {
  if (buffer == nullptr && buffer_size != 0)
    throw std::invalid_argument("arena_resource: null buffer with a nonzero size");
  buffer_ = static_cast<std::byte*>(buffer);
  buffer_size_ = buffer_size;
  first_chunk_size_ = next_chunk_size_ =
      grown(std::max<std::size_t>(buffer_size, 1), options_.growth_factor, options_.max_chunk_size);
  begin_ = cur_ = buffer_;
  end_ = buffer_ + buffer_size_;
}

arena_resource::arena_resource(const arena_options& options, std::pmr::memory_resource* upstream)
    : upstream_(checked(upstream)),
      options_(checked(options)),
      first_chunk_size_(options.initial_size),
      next_chunk_size_(options.initial_size) {}

arena_resource::~arena_resource() { free_chunks(first_); }

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

void arena_resource::release() noexcept {
  note_peak();
  free_chunks(first_);
  first_ = nullptr;
  enter(nullptr, 0);
  next_chunk_size_ = first_chunk_size_;
  used_ = allocations_ = 0;
  ++epoch_;
  history_.clear();
}

void arena_resource::reset() noexcept {
  note_peak();
  enter(nullptr, 0);
  used_ = allocations_ = 0;
  ++epoch_;
  history_.clear();
}

void arena_resource::trim() noexcept {
  chunk*& spares = current_ != nullptr ? current_->next : first_;
  free_chunks(spares);
  spares = nullptr;
}

void* arena_resource::allocate_slow(std::size_t bytes, std::size_t alignment) {
  if (!std::has_single_bit(alignment))
    throw type_error("arena_resource: alignment " + std::to_string(alignment) +
                     " is not a power of two");
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
  if (spare != nullptr && fits(spare)) {
    enter(spare, base);
  } else {
    // A fresh block, aligned for the request so it fits at the block's start. Every
    // check comes before the upstream call, so a failure changes nothing.
    const std::size_t block_align = std::max(alignment, alignof(std::max_align_t));
    const std::size_t want = std::max(n, next_chunk_size_);
    constexpr std::size_t limit = std::numeric_limits<std::size_t>::max();
    if (want > limit - sizeof(chunk) - (block_granule - 1) || block_align > (limit >> 1))
      throw std::bad_alloc();
    const std::size_t size = (want + sizeof(chunk) + block_granule - 1) & ~(block_granule - 1);
    auto* block = static_cast<std::byte*>(upstream_->allocate(size, block_align));
    auto* c = ::new (block + size - sizeof(chunk))
        chunk{spare, size | static_cast<std::size_t>(std::countr_zero(block_align))};
    (current_ != nullptr ? current_->next : first_) = c;
    reserved_ += size;
    ++chunks_;
    ++upstream_allocations_;
    next_chunk_size_ = grown(next_chunk_size_, options_.growth_factor, options_.max_chunk_size);
    enter(c, base);
  }
  // The region now fits the request: the bump cannot fail.
  return arena_resource::do_allocate(bytes, alignment);
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
                     .upstream_allocations = upstream_allocations_};
}

namespace detail {

// The position's logical offset rises with allocation and falls with rewinds and pops.
// A marker taken at clock c and key k is valid iff no fall since then went below k,
// i.e. the smallest key among the falls recorded with clock > c is >= k (the arena
// then is at or past k too, since it only rose after the last fall). Each fall is
// kept only while no later one is lower, so the keys increase with the clocks, and
// the smallest key after c is the first fall with clock > c: one binary search.
//
// A fall gets clock clock_ + 1: it applies to every marker taken so far, none taken
// later. A fall that no valid marker is above is not kept at all: valid markers are
// in order of clock and of offset, so the newest one, lowered by the falls since,
// bounds them. So a scope with no marker taken inside, a pop with none taken since the
// block, and rewinds to one marker again and again leave the history as it was; and
// two kept falls always have a mark between them, hence distinct clocks.
void marker_history::fall_to(key k) noexcept {
  if (highest_ <= k) return;
  highest_ = k;
  while (size_ > 0 && falls_[size_ - 1].to >= k) --size_;
  if (size_ == capacity) merge();
  falls_[size_++] = fall{clock_ + 1, k};
}

bool marker_history::valid(std::uint64_t clock, key k) const noexcept {
  const fall* end = falls_ + size_;
  const fall* after = std::upper_bound(
      falls_, end, clock, [](std::uint64_t c, const fall& f) { return c < f.clock; });
  return after == end || after->to >= k;
}

// Full: two neighbouring falls i, i+1 become one with the later clock and the lower
// key. That makes the markers taken between them (after fall i, before fall i+1)
// above the lower key look stale: a valid marker may be refused, a stale one is never
// accepted. Of those markers only the ones at or below fall i+1 were valid. When fall
// i+1 is a rewind whose marker was the first taken after fall i (its clock is fall i's),
// that marker is the only one: with scopes, one that has ended. The newest such pair
// is merged, the top fall excluded (its marker may be rewound to again). Failing that,
// the pair below the top: with scopes, the markers between them are of scopes ended
// inside the innermost open one (a loop's earlier iterations), while the open scopes
// were marked before the older falls.
void marker_history::merge() noexcept {
  std::size_t i = size_ - 2;
  while (i > 0 && falls_[i].to.tie != falls_[i - 1].clock) --i;
  if (i == 0) i = size_ - 2;
  --i;
  falls_[i].clock = falls_[i + 1].clock;
  std::copy(falls_ + i + 2, falls_ + size_, falls_ + i + 1);
  --size_;
}

}  // namespace detail

}  // namespace memshuffle
