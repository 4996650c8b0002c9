#pragma once
// Every std::pmr resource of the library, each built over a recording upstream (where
// it takes one, or a checking tracking_resource), for tests that must run on all of them. `finish()` destroys the
// resource and checks that the upstream saw only matching deallocations and has
// nothing outstanding.
#include <doctest/doctest.h>
#include <memshuffle/arena_resource.hpp>
#include <memshuffle/resource_adaptors.hpp>
#include <memshuffle/secure_page_resource.hpp>
#include <memshuffle/tracking_resource.hpp>
#include <test/support/recording_resource.hpp>

#include <memory_resource>
#include <optional>

namespace memshuffle::testing {

inline void check_nothing_outstanding(const recording_resource& upstream) {
  CHECK(upstream.mismatches() == 0);
  CHECK(upstream.outstanding() == 0);
}

struct arena_fixture {
  static constexpr const char* name = "arena_resource";
  recording_resource upstream;
  std::optional<arena_resource> resource{std::in_place, &upstream};
  std::pmr::memory_resource* get() { return &*resource; }
  void finish() {
    resource.reset();
    check_nothing_outstanding(upstream);
  }
};

// Resources that pass every element's allocation upstream are checked by a
// tracking_resource over new_delete instead: recording_resource keeps a std::map and
// a history of every block, too slow for millions of blocks (tracking_resource itself
// is checked against recording_resource in its own suite).
inline void check_nothing_outstanding(const tracking_resource& upstream) {
  CHECK_MESSAGE(!upstream.has_leaks(), upstream.report());
  CHECK(upstream.stats().bad_deallocations == 0);
}

struct tracking_fixture {
  static constexpr const char* name = "tracking_resource";
  std::optional<tracking_resource> resource{std::in_place, std::pmr::new_delete_resource()};
  std::pmr::memory_resource* get() { return &*resource; }
  void finish() {
    CHECK(resource->stats().total_allocations > 0);
    check_nothing_outstanding(*resource);
    resource.reset();
  }
};

// Page granular (each block its own mapping), so it serves containers the way it is
// meant to: as the upstream of an arena.
struct secure_page_fixture {
  static constexpr const char* name = "arena_resource over secure_page_resource";
  secure_page_resource pages;
  std::optional<arena_resource> resource{std::in_place, &pages};
  std::pmr::memory_resource* get() { return &*resource; }
  void finish() {
    CHECK(pages.stats().allocations > 0);
    resource.reset();
    CHECK(pages.stats().allocations == 0);
    CHECK(pages.stats().bytes_mapped == 0);
  }
};

// A round trip through both bridges: std -> boost -> std.
struct adaptor_fixture {
  static constexpr const char* name = "std_resource_adaptor over boost_resource_adaptor";
  tracking_resource upstream{std::pmr::new_delete_resource()};
  boost_resource_adaptor to_boost{&upstream};
  std_resource_adaptor resource{&to_boost};
  std::pmr::memory_resource* get() { return &resource; }
  void finish() { check_nothing_outstanding(upstream); }
};

#define MEMSHUFFLE_LIBRARY_RESOURCES                                       \
  memshuffle::testing::arena_fixture, memshuffle::testing::tracking_fixture, \
      memshuffle::testing::secure_page_fixture, memshuffle::testing::adaptor_fixture

}  // namespace memshuffle::testing
