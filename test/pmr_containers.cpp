#include <doctest/doctest.h>
#include <memshuffle/doctest.hpp>
#include <memshuffle/resource_adaptors.hpp>
#include <test/support/library_resources.hpp>

#include <boost/container/pmr/deque.hpp>
#include <boost/container/pmr/flat_map.hpp>
#include <boost/container/pmr/list.hpp>
#include <boost/container/pmr/map.hpp>
#include <boost/container/pmr/string.hpp>
#include <boost/container/pmr/vector.hpp>

#include <cstdint>
#include <deque>
#include <list>
#include <map>
#include <memory_resource>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

// A million elements per container, std::pmr and boost::container::pmr, on every
// resource of the library. Values are checked, not just sizes.

namespace {

constexpr std::size_t million = 1'000'000;

std::uint64_t value_of(std::size_t i) { return i * 0x9E3779B97F4A7C15ull + 7; }
char char_of(std::size_t i) { return static_cast<char>('a' + i % 26); }

template <class Sequence>
void check_sequence(Sequence c) {
  for (std::size_t i = 0; i < million; ++i) c.push_back(value_of(i));
  REQUIRE(c.size() == million);
  std::size_t i = 0, wrong = 0;
  for (const auto& v : c) wrong += v != value_of(i++);
  CHECK(wrong == 0);
  c.erase(c.begin(), std::next(c.begin(), million / 2));
  CHECK(c.front() == value_of(million / 2));
}

template <class String>
void check_string(String s) {
  for (std::size_t i = 0; i < million; ++i) s.push_back(char_of(i));
  REQUIRE(s.size() == million);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < million; ++i) wrong += s[i] != char_of(i);
  CHECK(wrong == 0);
  s.erase(0, million - 10);
  s.shrink_to_fit();
  CHECK(s.size() == 10);
}

template <class Map>
void check_map(Map m, std::size_t million = ::million) {
  // Keys in a scattered order, so trees rebalance and hash tables rehash.
  for (std::size_t i = 0; i < million; ++i) m.emplace(value_of(i), i);
  REQUIRE(m.size() == million);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < million; ++i) {
    auto it = m.find(value_of(i));
    wrong += it == m.end() || it->second != i;
  }
  CHECK(wrong == 0);
  for (std::size_t i = 0; i < million; i += 2) m.erase(value_of(i));
  CHECK(m.size() == million / 2);
}

}  // namespace

TEST_CASE_TEMPLATE("std::pmr containers hold a million elements on every resource", R,
                   MEMSHUFFLE_LIBRARY_RESOURCES) {
  CAPTURE(R::name);
  R fixture;
  std::pmr::memory_resource* r = fixture.get();
  SUBCASE("vector") { check_sequence(std::pmr::vector<std::uint64_t>(r)); }
  SUBCASE("deque") { check_sequence(std::pmr::deque<std::uint64_t>(r)); }
  SUBCASE("list") { check_sequence(std::pmr::list<std::uint64_t>(r)); }
  SUBCASE("string") { check_string(std::pmr::string(r)); }
  SUBCASE("map") { check_map(std::pmr::map<std::uint64_t, std::size_t>(r)); }
  SUBCASE("unordered_map") { check_map(std::pmr::unordered_map<std::uint64_t, std::size_t>(r)); }
  fixture.finish();
}

TEST_CASE_TEMPLATE("boost::container::pmr containers hold a million elements on every resource",
                   R, MEMSHUFFLE_LIBRARY_RESOURCES) {
  namespace bpmr = boost::container::pmr;
  CAPTURE(R::name);
  R fixture;
  memshuffle::boost_resource_adaptor r(fixture.get());
  SUBCASE("vector") { check_sequence(bpmr::vector<std::uint64_t>(&r)); }
  SUBCASE("deque") { check_sequence(bpmr::deque<std::uint64_t>(&r)); }
  SUBCASE("list") { check_sequence(bpmr::list<std::uint64_t>(&r)); }
  SUBCASE("string") { check_string(bpmr::string(&r)); }
  SUBCASE("map") { check_map(bpmr::map<std::uint64_t, std::size_t>(&r)); }
  SUBCASE("flat_map") {
    // Sorted inserts: a flat map is built in order in practice.
    bpmr::flat_map<std::uint64_t, std::size_t> m(&r);
    for (std::size_t i = 0; i < million; ++i) m.emplace_hint(m.end(), i, value_of(i));
    REQUIRE(m.size() == million);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < million; ++i) wrong += m.at(i) != value_of(i);
    CHECK(wrong == 0);
  }
  fixture.finish();
}

TEST_CASE("nested pmr containers pass their resource down to their elements") {
  MEMSHUFFLE_LEAK_CHECK();  // the inner strings must not fall back to the default
  memshuffle::testing::tracking_fixture fixture;
  std::pmr::memory_resource* r = fixture.get();
  {
    std::pmr::vector<std::pmr::string> v(r);
    for (std::size_t i = 0; i < 1000; ++i) v.emplace_back(100, char_of(i));
    for (std::size_t i = 0; i < v.size(); ++i) {
      REQUIRE(v[i].get_allocator().resource() == r);
      REQUIRE(std::string_view(v[i]) == std::string(100, char_of(i)));
    }
    CHECK(fixture.resource->stats().current_allocations > 1000);
  }
  fixture.finish();
}

TEST_CASE("containers on the default resource leave nothing behind") {
  MEMSHUFFLE_LEAK_CHECK();
  check_map(std::pmr::map<std::uint64_t, std::size_t>(), 100'000);
  memshuffle::boost_resource_adaptor r;  // over the default resource
  check_map(boost::container::pmr::map<std::uint64_t, std::size_t>(&r), 100'000);
}
