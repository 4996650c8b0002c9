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

void arena_resource::enter(chunk* c) noexcept {
  current_ = c;
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
  enter(nullptr);
  next_chunk_size_ = first_chunk_size_;
  used_ = allocations_ = 0;
  ++epoch_;
}

void arena_resource::reset() noexcept {
  note_peak();
  enter(nullptr);
  used_ = allocations_ = 0;
  ++epoch_;
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

  chunk* spare = current_ != nullptr ? current_->next : first_;
  if (spare != nullptr && fits(spare)) {
    enter(spare);
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
    enter(c);
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
  return m;
}

bool arena_resource::try_rewind(const arena_marker& m) noexcept {
  if (m.owner_ != this || m.epoch_ != epoch_) return false;
  auto* target = static_cast<chunk*>(m.chunk_);
  // The marker must lie at or before the current position: its chunk is the buffer
  // or one of the chunks up to the current one.
  if (target == current_) {
    if (reinterpret_cast<std::uintptr_t>(m.position_) > reinterpret_cast<std::uintptr_t>(cur_))
      return false;
  } else if (target != nullptr) {
    if (current_ == nullptr) return false;
    chunk* c = first_;
    while (c != target && c != current_) c = c->next;
    if (c != target) return false;
  }
  note_peak();
  enter(target);
  cur_ = m.position_;
  used_ = m.bytes_used_;
  allocations_ = m.allocations_;
  return true;
}

void arena_resource::rewind(const arena_marker& m) {
  if (!try_rewind(m))
    throw std::invalid_argument(
        "arena_resource: marker from another arena, or stale (taken before a reset, release or "
        "an earlier rewind)");
}

arena_stats arena_resource::stats() const noexcept {
  return arena_stats{.bytes_used = used_,
                     .bytes_reserved = reserved_,
                     .chunks = chunks_,
                     .allocations = allocations_,
                     .peak_bytes_used = std::max(peak_, used_),
                     .upstream_allocations = upstream_allocations_};
}

}  // namespace memshuffle
