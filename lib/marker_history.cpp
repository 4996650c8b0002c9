// The history of an arena's position that tells its stale markers from valid ones.
#include <memshuffle/detail/marker_history.hpp>

#include <algorithm>

namespace memshuffle::detail {

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

}  // namespace memshuffle::detail
