#pragma once
// Internal to tracking_resource: the live allocations of one shard of its books.
#include <memshuffle/tracking_resource.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace memshuffle::detail {

// Live allocations keyed by pointer: open addressing with linear probing and
// backward-shift deletion, so the hot path never allocates (a node-based map would
// cost a malloc per tracked allocation, more than the upstream itself).
class live_table {
 public:
  // The record of p, or null.
  allocation_record* find(const void* p) noexcept {
    if (slots_.empty()) return nullptr;
    for (std::size_t i = home(p);; i = (i + 1) & mask_) {
      if (slots_[i].pointer == p) return &slots_[i];
      if (slots_[i].pointer == nullptr) return nullptr;
    }
  }

  // At most three quarters full, so probe sequences stay short.
  bool has_room() const noexcept { return (size_ + 1) * 4 <= slots_.size() * 3; }

  // Doubles the table; the only step that can throw, and then nothing has changed.
  void grow() {
    std::vector<allocation_record> old(std::max<std::size_t>(64, slots_.size() * 2));
    old.swap(slots_);
    mask_ = slots_.size() - 1;
    shift_ = 64 - std::countr_zero(slots_.size());
    for (auto& r : old)
      if (r.pointer) place(r);
  }

  void insert(const allocation_record& r) noexcept {  // when has_room()
    place(r);
    ++size_;
  }

  void erase(allocation_record* r) noexcept {
    std::size_t hole = static_cast<std::size_t>(r - slots_.data());
    for (std::size_t i = (hole + 1) & mask_; slots_[i].pointer; i = (i + 1) & mask_) {
      // Move back any record whose probe sequence passes over the hole.
      if (((i - home(slots_[i].pointer)) & mask_) >= ((i - hole) & mask_)) {
        slots_[hole] = slots_[i];
        hole = i;
      }
    }
    slots_[hole] = allocation_record{};
    --size_;
  }

  std::size_t size() const noexcept { return size_; }

  template <class F>
  void for_each(F f) const {
    for (auto& r : slots_)
      if (r.pointer) f(r);
  }

  void clear() noexcept {
    std::fill(slots_.begin(), slots_.end(), allocation_record{});
    size_ = 0;
  }

 private:
  std::size_t home(const void* p) const noexcept {
    auto x = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(p));
    // Fibonacci hashing: the top bits of the product spread evenly spaced addresses
    // (a heap's blocks) evenly; lower bits of it cluster badly under linear probing.
    // An index that kept neighbouring blocks in neighbouring slots was 4% faster with
    // 1000 live blocks but three times slower with a million (long probe runs).
    return static_cast<std::size_t>((x * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  void place(const allocation_record& r) noexcept {
    std::size_t i = home(r.pointer);
    while (slots_[i].pointer) i = (i + 1) & mask_;
    slots_[i] = r;
  }

  std::vector<allocation_record> slots_;
  std::size_t mask_ = 0;
  int shift_ = 64;
  std::size_t size_ = 0;
};

}  // namespace memshuffle::detail
