#pragma once
// Internal to arena_resource: tells its stale markers from valid ones in constant
// space. Not part of the public interface.
#include <compare>
#include <cstddef>
#include <cstdint>

namespace memshuffle::detail {

// Tells stale markers from valid ones in constant space: the arena's position, as a
// logical offset, and the times it fell. A marker is valid while the position has not
// fallen below it since it was taken. Details in lib/marker_history.cpp.
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

}  // namespace memshuffle::detail
