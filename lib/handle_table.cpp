#include "handle_table.hpp"

#include <new>

namespace memshuffle::detail {

namespace {
constexpr unsigned tag_shift = handle_table::index_bits + handle_table::generation_bits;
}

handle_table::handle_table(std::uint16_t tag) : tag_(tag) {}

void handle_table::reserve_one() {
  if (free_head_ != none) return;
  if (slots_.size() > max_index) throw std::bad_alloc();  // out of handles
  if (slots_.size() == slots_.capacity()) slots_.reserve(slots_.empty() ? 64 : slots_.size() * 2);
}

std::uint32_t handle_table::acquire() noexcept {
  if (free_head_ != none) {
    const std::uint32_t i = free_head_;
    free_head_ = static_cast<std::uint32_t>(slots_[i].aux);
    slots_[i].aux = 0;
    return i;
  }
  slots_.emplace_back();  // reserve_one() made room: no reallocation, no throw
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

}  // namespace memshuffle::detail
