#include "handle_table.hpp"
#include "huge_page_resource.hpp"

#include <memshuffle/error.hpp>
#include <memshuffle/os_random.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <algorithm>
#include <array>
#include <mutex>
#include <new>

namespace memshuffle::detail {

namespace {
constexpr unsigned tag_shift = handle_table::index_bits + handle_table::generation_bits;
}

handle_table::handle_table(std::uint16_t tag, std::uint32_t first_generation, std::pmr::memory_resource* storage)
    : slots_(storage), first_generation_(first_generation), tag_(tag) {}

handle_table::~handle_table() { secure_wipe(slots_.data(), slots_.capacity() * sizeof(entry)); }

std::size_t handle_table::huge_page_bytes() const noexcept {
  const bool huge = slots_.get_allocator().resource() == &huge_page_resource::instance() &&
                    huge_page_resource::on_huge_pages(slots_.capacity() * sizeof(entry));
  return huge ? metadata_bytes() : 0;
}

void handle_table::reserve_one() {
  if (free_head_ != none) return;
  if (slots_.size() > max_index) throw std::bad_alloc();  // out of handles
  if (slots_.size() == slots_.capacity()) grow(slots_.empty() ? 64 : slots_.size() * 2);
}

void handle_table::grow(std::size_t capacity) {
  // Entry addresses and counters must not stay behind in storage given back.
  std::pmr::vector<entry> bigger(slots_.get_allocator());
  bigger.reserve(capacity);
  bigger.assign(slots_.begin(), slots_.end());
  secure_wipe(slots_.data(), slots_.capacity() * sizeof(entry));
  slots_.swap(bigger);
}

std::uint32_t handle_table::acquire() noexcept {
  if (free_head_ != none) {
    const std::uint32_t i = free_head_;
    free_head_ = static_cast<std::uint32_t>(slots_[i].aux);
    slots_[i].aux = 0;
    return i;
  }
  slots_.emplace_back();  // reserve_one() made room: no reallocation, no throw
  slots_.back().generation = first_generation_;
  return static_cast<std::uint32_t>(slots_.size() - 1);
}

void handle_table::invalidate(std::uint32_t i) noexcept { ++slots_[i].generation; }

void handle_table::recycle(std::uint32_t i) noexcept {
  entry& e = slots_[i];
  const std::uint32_t generation = e.generation;
  e = entry{};
  e.generation = generation;
  // A slot whose generations are used up stays unused for good: reusing it could make
  // a stale handle name a new entry.
  if (generation > max_generation) return;
  e.aux = free_head_;
  free_head_ = i;
}

entry* handle_table::find(handle h) noexcept {
  return const_cast<entry*>(static_cast<const handle_table*>(this)->find(h));
}

const entry* handle_table::find(handle h) const noexcept {
  const auto v = static_cast<std::uint64_t>(h);
  if ((v >> tag_shift) != tag_) return nullptr;
  const std::uint32_t i = index_of(h);
  if (i >= slots_.size()) return nullptr;
  const entry& e = slots_[i];
  const auto generation = static_cast<std::uint32_t>((v >> index_bits) & max_generation);
  if (e.generation != generation || !e.live()) return nullptr;
  return &e;
}

handle handle_table::handle_of(std::uint32_t i) const noexcept {
  return static_cast<handle>(std::uint64_t{tag_} << tag_shift |
                             std::uint64_t{slots_[i].generation} << index_bits | i);
}

std::uint32_t handle_table::generations_used() const noexcept {
  // A live slot's generation has been handed out, a freed one's was bumped past it.
  std::uint32_t used = first_generation_;
  for (const entry& e : slots_) used = std::max(used, e.generation + 1);
  return used;
}

// --- the tag registry -------------------------------------------------------------

namespace {

struct tag_registry {
  static constexpr std::uint32_t owned = 0x8000'0000;
  std::mutex m;
  // By tag: the first generation no earlier table used, and `owned` while one lives.
  std::array<std::uint32_t, 0x10000> state{};
  std::uint32_t cursor = 0;
};

tag_registry& registry() noexcept {
  // Never destroyed: static shufflers release their tags at exit.
  alignas(tag_registry) static unsigned char storage[sizeof(tag_registry)];
  static tag_registry* const r = [] {
    auto* fresh = ::new (storage) tag_registry();
    os_random(std::as_writable_bytes(std::span(&fresh->cursor, 1)));
    return fresh;
  }();
  return *r;
}

}  // namespace

tag_grant acquire_tag() {
  tag_registry& r = registry();
  std::lock_guard lock(r.m);
  for (std::uint32_t tried = 0; tried < 0x10000; ++tried) {
    const auto tag = static_cast<std::uint16_t>(r.cursor++);
    std::uint32_t& s = r.state[tag];
    if (tag == 0 || (s & tag_registry::owned) != 0 || s > handle_table::max_generation) continue;
    const std::uint32_t first_generation = s;
    s |= tag_registry::owned;
    return {tag, first_generation};
  }
  throw error("memshuffle: no shuffler tag left (every one is in use or has used up its handles)");
}

void release_tag(std::uint16_t tag, std::uint32_t generations_used) noexcept {
  tag_registry& r = registry();
  std::lock_guard lock(r.m);
  std::uint32_t& s = r.state[tag];
  s = std::max(s & ~tag_registry::owned, generations_used);
}

}  // namespace memshuffle::detail
