// The exception-test helper: every allocation failing in turn, leaks checked after
// each failing run.
#include <doctest/doctest.h>
#include <memshuffle/doctest.hpp>
#include <memshuffle/exception_test.hpp>

#include <memory_resource>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

using memshuffle::exception_test;
using memshuffle::exception_test_options;
using memshuffle::tracking_resource;

TEST_SUITE("resources") {

TEST_CASE("each allocation fails in turn until the code runs through") {
  tracking_resource r;
  std::vector<std::size_t> seen;
  const auto result = exception_test(r, [&](std::size_t n) {
    seen.push_back(n);
    for (int i = 0; i < 4; ++i) r.deallocate(r.allocate(8, 8), 8, 8);
  });
  CHECK(result.completed);
  CHECK(result.runs == 5);
  CHECK(result.failed_runs == 4);
  CHECK(result.absorbed_runs == 0);
  CHECK(result.leaks.empty());
  CHECK(seen == std::vector<std::size_t>{0, 1, 2, 3, 4});
  CHECK(r.stats().injected_failures == 4);
}

TEST_CASE("a failing run that leaks is reported with the blocks it left") {
  tracking_resource r;
  std::vector<void*> kept;
  const auto result = exception_test(r, [&] {
    void* a = r.allocate(16, 8);  // leaks when the second allocation fails
    void* b = r.allocate(32, 8);
    r.deallocate(b, 32, 8);
    r.deallocate(a, 16, 8);
  });
  REQUIRE(result.leaks.size() == 1);
  CHECK(result.leaks[0].failing_allocation == 1);
  REQUIRE(result.leaks[0].blocks.size() == 1);
  CHECK(result.leaks[0].blocks[0].bytes == 16);
  r.release_leaks();
}

TEST_CASE("blocks allocated before the test do not count as leaks") {
  tracking_resource r;
  void* before = r.allocate(64, 8);
  const auto result = exception_test(r, [&] { r.deallocate(r.allocate(8, 8), 8, 8); });
  CHECK(result.leaks.empty());
  r.deallocate(before, 64, 8);
}

TEST_CASE("a run that absorbs a failure goes on to the next allocation") {
  tracking_resource r;
  const auto result = exception_test(r, [&] {
    try {
      r.deallocate(r.allocate(8, 8), 8, 8);
    } catch (const std::bad_alloc&) {
      // a fallback that needs no memory
    }
    r.deallocate(r.allocate(8, 8), 8, 8);
  });
  CHECK(result.completed);
  CHECK(result.absorbed_runs == 1);
  CHECK(result.failed_runs == 1);
}

TEST_CASE("other exceptions, and a bad_alloc nobody injected, propagate with failures off") {
  tracking_resource r;
  CHECK_THROWS_AS(exception_test(r, [&] { throw std::runtime_error("boom"); }), std::runtime_error);
  CHECK_THROWS_AS(exception_test(r, [&] { throw std::bad_alloc(); }), std::bad_alloc);
  r.deallocate(r.allocate(8, 8), 8, 8);  // failures are off again
}

TEST_CASE("the hooks run before each run, after each failure and after completion") {
  tracking_resource r;
  std::string trace;
  exception_test_options o;
  o.before_run = [&](std::size_t n) { trace += "b" + std::to_string(n); };
  o.after_failure = [&](std::size_t n) { trace += "f" + std::to_string(n); };
  o.after_completion = [&](std::size_t n) { trace += "c" + std::to_string(n); };
  (void)exception_test(r, [&] { r.deallocate(r.allocate(8, 8), 8, 8); }, o);
  CHECK(trace == "b0f0b1c1");
}

TEST_CASE("max_runs bounds a body that never runs through") {
  tracking_resource r;
  exception_test_options o;
  o.max_runs = 3;
  const auto result = exception_test(r, [&](std::size_t n) {
    for (std::size_t i = 0; i <= n + 1; ++i) r.deallocate(r.allocate(8, 8), 8, 8);
  }, o);
  CHECK_FALSE(result.completed);
  CHECK(result.runs == 3);
}

TEST_CASE("the doctest form checks a container's exception safety") {
  tracking_resource r;
  const auto result = MEMSHUFFLE_EXCEPTION_TEST(r) {
    std::pmr::vector<std::pmr::string> v(&r);
    for (int i = 0; i < 3; ++i) v.emplace_back(100, 'x');
  };
  CHECK(result.completed);
  CHECK(result.failed_runs >= 6);
  CHECK_FALSE(r.has_leaks());
}

TEST_CASE("the doctest form fails once per leaking run" * doctest::expected_failures(1)) {
  tracking_resource r;
  MEMSHUFFLE_EXCEPTION_TEST(r) {
    void* a = r.allocate(16, 8);
    r.deallocate(r.allocate(8, 8), 8, 8);  // failing here leaks a
    r.deallocate(a, 16, 8);
  };
  r.release_leaks();
}

}  // TEST_SUITE
