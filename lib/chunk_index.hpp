#pragma once
// The heap's chunks by address, to find the arena an entry lies in: a vector sorted by
// start address in which an erased chunk leaves a gap instead of closing up. An insert
// fills the nearest gap, shifting only the chunks between, and the gaps are squeezed
// out once they outnumber the chunks. So opening or giving back an arena costs about
// a search, where a plain sorted vector moved half of it each time (on a 1 GiB heap of
// 64 KiB arenas, 200 KB per arena: most of an incremental shuffle step's time).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace memshuffle::detail {

template <class Owner>
class chunk_index {
 public:
  struct chunk {
    std::uintptr_t begin, end;
    Owner* owner;  // null: a gap (an erased chunk, kept in order by its old start)
  };

  // Room for one more chunk, so insert() cannot fail. Can throw std::bad_alloc, and
  // changes nothing else.
  void reserve_one() {
    if (gaps_ == 0 && v_.size() == v_.capacity()) v_.reserve(v_.size() * 2 + 8);
  }
  // After reserve_one(); [begin, end) overlaps no chunk of the index.
  void insert(std::uintptr_t begin, std::uintptr_t end, Owner* owner) noexcept {
    const chunk c{begin, end, owner};
    std::size_t pos = static_cast<std::size_t>(std::upper_bound(v_.begin(), v_.end(), begin, starts_before) - v_.begin());
    if (gaps_ == 0) {
      v_.push_back(c);
      std::rotate(v_.begin() + static_cast<std::ptrdiff_t>(pos), v_.end() - 1, v_.end());
      return;
    }
    --gaps_;
    // The nearest gap: the chunks between it and pos shift by one towards it.
    for (std::size_t d = 0;; ++d) {
      if (pos >= d + 1 && v_[pos - d - 1].owner == nullptr) {
        std::move(v_.begin() + static_cast<std::ptrdiff_t>(pos - d), v_.begin() + static_cast<std::ptrdiff_t>(pos),
                  v_.begin() + static_cast<std::ptrdiff_t>(pos - d - 1));
        v_[pos - 1] = c;
        return;
      }
      if (pos + d < v_.size() && v_[pos + d].owner == nullptr) {
        std::move_backward(v_.begin() + static_cast<std::ptrdiff_t>(pos),
                           v_.begin() + static_cast<std::ptrdiff_t>(pos + d),
                           v_.begin() + static_cast<std::ptrdiff_t>(pos + d + 1));
        v_[pos] = c;
        return;
      }
    }
  }
  // Erases the chunk that starts at begin (it must be in the index).
  void erase(std::uintptr_t begin) noexcept {
    auto it = std::lower_bound(v_.begin(), v_.end(), begin, [](const chunk& c, std::uintptr_t at) { return c.begin < at; });
    while (it->owner == nullptr) ++it;  // a gap may share the start address
    it->owner = nullptr;
    if (++gaps_ <= live() + 8) return;
    v_.erase(std::remove_if(v_.begin(), v_.end(), [](const chunk& c) { return c.owner == nullptr; }), v_.end());
    gaps_ = 0;
  }
  // The owner of the chunk holding at, or null.
  Owner* find(std::uintptr_t at) const noexcept {
    auto it = std::upper_bound(v_.begin(), v_.end(), at, starts_before);
    // Gaps between the holding chunk and at lie inside it (memory given back and taken
    // again): at most a few.
    while (it != v_.begin()) {
      --it;
      if (it->owner != nullptr) return at < it->end ? it->owner : nullptr;
    }
    return nullptr;
  }

  std::size_t live() const noexcept { return v_.size() - gaps_; }
  bool empty() const noexcept { return live() == 0; }
  // Calls f(chunk) for every chunk, by address.
  template <class F>
  void for_each(F&& f) const {
    for (const chunk& c : v_)
      if (c.owner != nullptr) f(c);
  }

 private:
  static bool starts_before(std::uintptr_t at, const chunk& c) noexcept { return at < c.begin; }

  std::vector<chunk> v_;
  std::size_t gaps_ = 0;
};

}  // namespace memshuffle::detail
