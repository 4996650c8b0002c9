// MEMSHUFFLE_LEAK_CHECK_EVERY_TEST_CASE: every test case of this suite is leak checked
// without a guard of its own. The cases marked skip are run by the last one, in a
// child run of this same program, to see a leak fail the whole run.
#include <doctest/doctest.h>
#include <memshuffle/doctest.hpp>

#include <cstdio>
#include <filesystem>
#include <memory_resource>
#include <string>
#include <vector>

MEMSHUFFLE_LEAK_CHECK_EVERY_TEST_CASE(.capture_stacks = true);

namespace {

// Runs this program with the given arguments; returns its exit status and output.
std::pair<int, std::string> run_self(const std::string& args) {
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const std::string command = "'" + self + "' --no-intro --no-version " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string out;
  char buffer[4096];
  while (std::size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) out.append(buffer, n);
  return {pclose(pipe), out};
}

}  // namespace

TEST_SUITE("resources") {

TEST_CASE("a test case that frees what it allocates passes") {
  std::pmr::vector<std::pmr::string> v;
  for (int i = 0; i < 50; ++i) v.emplace_back(40, 'x');
  CHECK(std::pmr::get_default_resource() != std::pmr::new_delete_resource());
}

// Each leak is followed by a check, so the allocation is not a tail call (a tail call
// leaves no frame of the test case on the stack to name).
TEST_CASE("a test case that leaks fails" * doctest::expected_failures(1)) {
  void* p = std::pmr::get_default_resource()->allocate(64, 8);
  CHECK(p != nullptr);
}

TEST_CASE("subcases share the test case's check" * doctest::expected_failures(1)) {
  SUBCASE("clean") { std::pmr::string s(100, 'a'); }
  SUBCASE("leaky") { CHECK(std::pmr::get_default_resource()->allocate(8, 8) != nullptr); }
}

TEST_CASE("leaker" * doctest::skip()) {
  void* p = std::pmr::get_default_resource()->allocate(24, 8);
  CHECK(p != nullptr);
}
const int leaker_line = __LINE__ - 3;

TEST_CASE("clean" * doctest::skip()) {
  std::pmr::string s(100, 'a');
}

TEST_CASE("a leak makes the run fail, and the message names the allocating line") {
  const auto [status, out] = run_self("--no-skip -tc=leaker");
  CAPTURE(out);
  CHECK(status != 0);
  CHECK(out.find("doctest_listener.cpp:" + std::to_string(leaker_line)) != std::string::npos);
  CHECK(out.find("1 failed") != std::string::npos);
  const auto [clean_status, clean_out] = run_self("--no-skip -tc=clean");
  CAPTURE(clean_out);
  CHECK(clean_status == 0);
}

}  // TEST_SUITE
