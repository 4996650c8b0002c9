#include <doctest/doctest.h>
#include <memshuffle/doctest.hpp>
#include <memshuffle/resource_adaptors.hpp>
#include <test/support/library_resources.hpp>
#include <test/support/upstream_checks.hpp>

#include <boost/container/pmr/global_resource.hpp>
#include <boost/container/pmr/list.hpp>
#include <boost/container/pmr/map.hpp>
#include <boost/container/pmr/monotonic_buffer_resource.hpp>
#include <boost/container/pmr/string.hpp>
#include <boost/container/pmr/unsynchronized_pool_resource.hpp>
#include <boost/container/pmr/vector.hpp>

#include <cstdint>
#include <map>
#include <memory_resource>
#include <vector>

using memshuffle::boost_resource_adaptor;
using memshuffle::std_resource_adaptor;
using memshuffle::testing::check_upstream_clean;
using memshuffle::testing::recording_resource;
namespace bpmr = boost::container::pmr;

namespace {

bool aligned(const void* p, std::size_t alignment) {
  return reinterpret_cast<std::uintptr_t>(p) % alignment == 0;
}

// Allocates with every power-of-two alignment up to 4096 through `through` and checks
// that `recorder` (underneath) saw exactly the size and alignment asked for.
template <class Resource>
void check_alignments_pass_through(Resource& through, const recording_resource& recorder) {
  for (std::size_t alignment = 1; alignment <= 4096; alignment *= 2) {
    CAPTURE(alignment);
    const std::size_t bytes = alignment + 3;
    void* p = through.allocate(bytes, alignment);
    CHECK(aligned(p, alignment));
    REQUIRE_FALSE(recorder.history().empty());
    CHECK(recorder.history().back().bytes == bytes);
    CHECK(recorder.history().back().alignment == alignment);
    through.deallocate(p, bytes, alignment);
  }
  check_upstream_clean(recorder);
}

struct alignas(4096) page_aligned {
  std::uint64_t value;
};

// A few boost containers over `r`, values checked.
void use_boost_containers(bpmr::memory_resource* r) {
  bpmr::vector<int> v(r);
  for (int i = 0; i < 1000; ++i) v.push_back(i * 3);
  bpmr::string s(r);
  for (int i = 0; i < 500; ++i) s += static_cast<char>('a' + i % 26);
  bpmr::map<int, bpmr::string> m(r);
  for (int i = 0; i < 200; ++i) m.emplace(i, bpmr::string(40, static_cast<char>('A' + i % 26), r));
  bpmr::list<int> l(r);
  for (int i = 0; i < 300; ++i) l.push_front(i);
  bpmr::vector<page_aligned> pages(r);
  for (std::uint64_t i = 0; i < 3; ++i) pages.push_back({i});

  for (int i = 0; i < 1000; ++i) REQUIRE(v[static_cast<std::size_t>(i)] == i * 3);
  for (int i = 0; i < 500; ++i) REQUIRE(s[static_cast<std::size_t>(i)] == 'a' + i % 26);
  for (int i = 0; i < 200; ++i) {
    REQUIRE(m.at(i).size() == 40);
    REQUIRE(m.at(i)[39] == 'A' + i % 26);
    REQUIRE(m.at(i).get_allocator().resource() == r);
  }
  CHECK(l.front() == 299);
  CHECK(l.back() == 0);
  for (std::uint64_t i = 0; i < 3; ++i) {
    CHECK(aligned(&pages[i], 4096));
    CHECK(pages[i].value == i);
  }
}

// std::pmr::monotonic_buffer_resource and the pool are std resources too.
struct std_monotonic_fixture {
  static constexpr const char* name = "std::pmr::monotonic_buffer_resource";
  recording_resource upstream;
  std::optional<std::pmr::monotonic_buffer_resource> resource{std::in_place, &upstream};
  std::pmr::memory_resource* get() { return &*resource; }
  void finish() {
    resource.reset();
    memshuffle::testing::check_nothing_outstanding(upstream);
  }
};

struct std_pool_fixture {
  static constexpr const char* name = "std::pmr::unsynchronized_pool_resource";
  recording_resource upstream;
  std::optional<std::pmr::unsynchronized_pool_resource> resource{std::in_place, &upstream};
  std::pmr::memory_resource* get() { return &*resource; }
  void finish() {
    resource.reset();
    memshuffle::testing::check_nothing_outstanding(upstream);
  }
};

}  // namespace

TEST_CASE("the boost adaptor passes every alignment up to 4096 through unchanged") {
  recording_resource recorder;
  boost_resource_adaptor adaptor(&recorder);
  check_alignments_pass_through(adaptor, recorder);
}

TEST_CASE("the std adaptor passes every alignment up to 4096 through unchanged") {
  recording_resource recorder;
  boost_resource_adaptor to_boost(&recorder);
  std_resource_adaptor adaptor(&to_boost);
  check_alignments_pass_through(adaptor, recorder);
}

TEST_CASE("an over-aligned boost allocation works through the bridge over an arena") {
  // boostorg/container#107: boost's monotonic_buffer_resource rejects alignments above
  // max_align_t; an arena_resource behind the bridge serves them.
  recording_resource upstream;
  {
    memshuffle::arena_resource arena(&upstream);
    boost_resource_adaptor adaptor(&arena);
    for (std::size_t alignment = 1; alignment <= 4096; alignment *= 2) {
      CAPTURE(alignment);
      CHECK(aligned(adaptor.allocate(alignment, alignment), alignment));
    }
  }
  memshuffle::testing::check_nothing_outstanding(upstream);
}

TEST_CASE_TEMPLATE("boost containers work over every std resource", R, MEMSHUFFLE_LIBRARY_RESOURCES,
                   std_monotonic_fixture, std_pool_fixture) {
  CAPTURE(R::name);
  R fixture;
  {
    boost_resource_adaptor adaptor(fixture.get());
    use_boost_containers(&adaptor);
  }
  fixture.finish();
}

TEST_CASE("boost containers work directly over a secure_page_resource") {
  memshuffle::secure_page_resource pages;
  {
    boost_resource_adaptor adaptor(&pages);
    use_boost_containers(&adaptor);
    CHECK(pages.stats().total_allocations > 0);
  }
  CHECK(pages.stats().allocations == 0);
}

TEST_CASE("std containers work over boost resources through the std adaptor") {
  bpmr::unsynchronized_pool_resource pool;
  bpmr::monotonic_buffer_resource monotonic;
  for (bpmr::memory_resource* boost_resource :
       {bpmr::new_delete_resource(), static_cast<bpmr::memory_resource*>(&pool),
        static_cast<bpmr::memory_resource*>(&monotonic)}) {
    std_resource_adaptor adaptor(boost_resource);
    std::pmr::map<int, std::pmr::vector<int>> m(&adaptor);
    for (int i = 0; i < 500; ++i) m[i].assign(static_cast<std::size_t>(i % 17), i);
    for (int i = 0; i < 500; ++i) {
      REQUIRE(m[i].size() == static_cast<std::size_t>(i % 17));
      if (!m[i].empty()) REQUIRE(m[i].back() == i);
      REQUIRE(m[i].get_allocator().resource() == &adaptor);
    }
  }
}

TEST_CASE("a default boost adaptor serves from the default std resource") {
  MEMSHUFFLE_LEAK_CHECK();
  boost_resource_adaptor adaptor;
  CHECK(adaptor.upstream_resource() == std::pmr::get_default_resource());
  use_boost_containers(&adaptor);
}

TEST_CASE("adaptors are equal when the resources underneath are equal") {
  recording_resource a, b;
  boost_resource_adaptor over_a(&a), also_over_a(&a), over_b(&b);
  CHECK(over_a.is_equal(also_over_a));
  CHECK(over_a == also_over_a);
  CHECK_FALSE(over_a.is_equal(over_b));
  CHECK_FALSE(over_a.is_equal(*bpmr::new_delete_resource()));

  std_resource_adaptor back_to_std(&over_a), also_back(&also_over_a), other(&over_b);
  CHECK(back_to_std.is_equal(also_back));
  CHECK_FALSE(back_to_std.is_equal(other));
  // A round trip std -> boost -> std is the resource it started from.
  CHECK(back_to_std.is_equal(a));
  CHECK_FALSE(back_to_std.is_equal(b));

  bpmr::unsynchronized_pool_resource pool;
  std_resource_adaptor pool_as_std(&pool);
  boost_resource_adaptor pool_again(&pool_as_std);
  CHECK(pool_again.is_equal(pool));
  CHECK_FALSE(pool_again.is_equal(*bpmr::new_delete_resource()));
}

TEST_CASE("memory from a round trip can be given back to the resource it started from") {
  recording_resource recorder;
  boost_resource_adaptor to_boost(&recorder);
  std_resource_adaptor round_trip(&to_boost);
  std::pmr::polymorphic_allocator<std::uint64_t> via_trip(&round_trip), direct(&recorder);
  REQUIRE(via_trip == direct);  // so a container may free with either
  std::uint64_t* p = via_trip.allocate(100);
  direct.deallocate(p, 100);
  memshuffle::testing::check_nothing_outstanding(recorder);
}
