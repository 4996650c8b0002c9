// tracking_resource's exact peak over shards, on its own (one thread: the locking is
// the resource's; tracking_resource_features tests it across threads).
#include <doctest/doctest.h>

#include "lib/shared_peak.hpp"

using memshuffle::detail::shard_usage;
using memshuffle::detail::shared_peak;

namespace {

// What the resource does: grant, else take back from the others, then grant or raise.
void count(shared_peak& peak, shard_usage& mine, shard_usage& other, std::size_t add) {
  if (!mine.fits(add) && !peak.grant(mine, add)) {
    peak.reclaim(other);
    if (!peak.grant(mine, add)) peak.raise(mine, add);
  }
  mine.current += add;
}

}  // namespace

TEST_SUITE("resources") {

TEST_CASE("a peak rises to exactly the sum of the shards' uses") {
  shared_peak peak;
  shard_usage a, b;
  count(peak, a, b, 100);
  count(peak, b, a, 30);
  CHECK(peak.peak() == 130);
  a.current -= 100;
  count(peak, b, a, 50);  // a gives back its allowance: 80 in use, not a new peak
  CHECK(peak.peak() == 130);
  count(peak, a, b, 60);  // 140 in use at once
  CHECK(peak.peak() == 140);
  CHECK(a.allowed + b.allowed <= peak.peak());
}

TEST_CASE("a grant from the spare leaves half the rest for the next request") {
  shared_peak peak;
  shard_usage a, b;
  count(peak, a, b, 100);
  a.current = 0;
  peak.reclaim(a);  // spare 100
  CHECK(peak.grant(b, 10));
  CHECK(b.allowed == 10 + 45);
  CHECK_FALSE(peak.grant(a, 50));  // 45 left
  CHECK(a.allowed == 0);
  CHECK(peak.peak() == 100);
}

TEST_CASE("a shard within its allowance needs nothing from the peak") {
  shard_usage u{.current = 5, .allowed = 8};
  CHECK(u.fits(3));
  CHECK_FALSE(u.fits(4));
  CHECK(u.need(3) == 0);
  CHECK(u.need(7) == 4);
}

}  // TEST_SUITE
