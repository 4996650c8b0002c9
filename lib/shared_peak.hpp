#pragma once
// Internal to tracking_resource: the exact peak of a quantity (bytes, allocations) whose
// current value is split among shards, without a shared counter touched on every change.
//
// Each shard has an allowance, and the allowances plus an unallotted spare add up to the
// peak. A shard grows on its own up to its allowance, so the sum of the shards' current
// values never passes the peak unseen. A shard that would pass its allowance asks this
// object (the caller holds a lock that every change of an allowance takes): from the
// spare if it is enough; otherwise the caller takes back what the other shards do not
// use (holding their locks, so their current values are exact) and the peak rises to
// exactly the sum of the current values plus the new request.
#include <cstddef>

namespace memshuffle::detail {

// One shard's share of a quantity; current <= allowed always.
struct shard_usage {
  std::size_t current = 0;
  std::size_t allowed = 0;

  bool fits(std::size_t add) const noexcept { return add <= allowed - current; }
  std::size_t need(std::size_t add) const noexcept { return fits(add) ? 0 : current + add - allowed; }
};

class shared_peak {
 public:
  std::size_t peak() const noexcept { return peak_; }

  // \effects Lets `u` grow by `add` from the spare, with half of what is left over so
  // the next requests need not ask. \returns false, changing nothing, when the spare is short.
  bool grant(shard_usage& u, std::size_t add) noexcept {
    const std::size_t need = u.need(add);
    if (need > spare_) return false;
    const std::size_t take = need + (spare_ - need) / 2;
    u.allowed += take;
    spare_ -= take;
    return true;
  }

  // \effects Takes back the allowance a shard does not use (its lock held).
  void reclaim(shard_usage& u) noexcept {
    spare_ += u.allowed - u.current;
    u.allowed = u.current;
  }

  // \effects With every other shard reclaimed and grant() refused: the current values
  // plus `add` are a new peak, exactly.
  void raise(shard_usage& u, std::size_t add) noexcept {
    const std::size_t need = u.need(add);
    peak_ += need - spare_;
    u.allowed += need;
    spare_ = 0;
  }

 private:
  std::size_t peak_ = 0;
  std::size_t spare_ = 0;  // = peak_ - the sum of the allowances
};

}  // namespace memshuffle::detail
