#include <doctest/doctest.h>
#include <memshuffle/doctest.hpp>

#include <memory_resource>
#include <string>
#include <vector>

using memshuffle::leak_check;

namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("a leak check passes when everything allocated is freed") {
  MEMSHUFFLE_LEAK_CHECK();
  std::pmr::vector<std::pmr::string> v;
  for (int i = 0; i < 100; ++i) v.emplace_back(50, 'x');
  CHECK(v.back().size() == 50);
}

TEST_CASE("a leak check installs a tracking resource and restores the previous default") {
  std::pmr::memory_resource* before = std::pmr::get_default_resource();
  {
    leak_check check;
    CHECK(std::pmr::get_default_resource() == &check.resource());
    CHECK(check.resource().upstream_resource() == before);
    std::pmr::vector<int> v{1, 2, 3};
    CHECK(check.resource().stats().current_allocations == 1);
  }
  CHECK(std::pmr::get_default_resource() == before);
}

TEST_CASE("leak checks nest") {
  leak_check outer;
  {
    leak_check inner;
    CHECK(inner.resource().upstream_resource() == &outer.resource());
    std::pmr::string s(100, 'y');
    CHECK(outer.resource().stats().current_allocations == 1);
  }
  CHECK(std::pmr::get_default_resource() == &outer.resource());
  CHECK(outer.resource().stats().total_allocations == 1);
}

TEST_CASE("a leak check's failure message lists the leak and is empty once it is freed") {
  leak_check check;
  auto* r = std::pmr::get_default_resource();
  void* p = r->allocate(24, 8);
  const std::string message = check.failure_message();
  CAPTURE(message);
  CHECK(contains(message, "leak: allocation #1, 24 bytes, alignment 8"));
  CHECK(contains(message, "totals: 1 live allocations (24 bytes)"));
  r->deallocate(p, 24, 8);
  CHECK(check.failure_message().empty());
}

TEST_CASE("the leak check options reach its tracking resource") {
  leak_check check({.fill_on_allocate = std::byte{0x3C}});
  std::pmr::vector<unsigned char> v;
  v.reserve(16);
  CHECK(*v.data() == 0x3C);
}

// These cases deliberately misuse memory: each must end with exactly one failed
// check, the leak check's own (the run counts them as passed). The leak check gives
// leaked blocks back after reporting, so the sanitizer build sees no leak.
TEST_CASE("a test case that leaks fails" * doctest::expected_failures(1)) {
  MEMSHUFFLE_LEAK_CHECK();
  (void)std::pmr::get_default_resource()->allocate(64, 8);
}

TEST_CASE("a test case that frees a block twice fails" * doctest::expected_failures(1)) {
  MEMSHUFFLE_LEAK_CHECK();
  auto* r = std::pmr::get_default_resource();
  void* p = r->allocate(32, 8);
  r->deallocate(p, 32, 8);
  r->deallocate(p, 32, 8);  // caught by the tracking resource, never reaches malloc
}

TEST_CASE("a test case that frees with the wrong size fails" * doctest::expected_failures(1)) {
  MEMSHUFFLE_LEAK_CHECK();
  auto* r = std::pmr::get_default_resource();
  void* p = r->allocate(32, 8);
  r->deallocate(p, 16, 8);  // reported; the block stays live, so it is also a leak
}
