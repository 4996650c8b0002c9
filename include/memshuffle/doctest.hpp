#pragma once
// doctest helpers: make a test case fail when it leaks memory, or deallocates badly,
// through the default std::pmr resource.
//
//   TEST_CASE("a parser frees what it allocates") {
//     MEMSHUFFLE_LEAK_CHECK();
//     std::pmr::vector<int> v{1, 2, 3};   // uses the default resource
//   }
//
// The names live in namespace memshuffle (not memshuffle::doctest) so that a test file
// with `using namespace memshuffle;` still sees doctest's own `doctest::` unambiguously.
#include <doctest/doctest.h>
#include <memshuffle/tracking_resource.hpp>

#include <memory_resource>
#include <string>

namespace memshuffle {

// RAII: installs a tracking_resource (over the current default) as the default
// resource; when the scope ends it restores the previous default and, if anything
// allocated in the scope is still live or any deallocation was bad, fails the current
// test case with the report. Leaked blocks are then given back, so one failing test
// does not leave memory behind for the rest of the run or for LeakSanitizer.
// Everything allocated inside the scope must be freed before it ends: declare it
// first in the test case.
class leak_check {
 public:
  explicit leak_check(tracking_options options = {},
                      const char* file = __builtin_FILE(), int line = __builtin_LINE())
      : previous_(std::pmr::get_default_resource()),
        tracking_(options, previous_),
        file_(file),
        line_(line) {
    std::pmr::set_default_resource(&tracking_);
  }
  leak_check(const leak_check&) = delete;
  leak_check& operator=(const leak_check&) = delete;

  ~leak_check() {
    std::pmr::set_default_resource(previous_);
    const std::string message = failure_message();
    if (!message.empty()) {
      DOCTEST_ADD_FAIL_CHECK_AT(file_, line_, message);
      tracking_.release_leaks();
    }
  }

  tracking_resource& resource() noexcept { return tracking_; }

  // The text the scope would fail with if it ended now; empty when clean.
  std::string failure_message() const {
    if (!tracking_.has_leaks() && !tracking_.has_bad_deallocations()) return {};
    return "memory leak or bad deallocation through the default resource:\n" +
           tracking_.report();
  }

 private:
  std::pmr::memory_resource* previous_;
  tracking_resource tracking_;
  const char* file_;
  int line_;
};

}  // namespace memshuffle

// One line at the top of a test case: the whole case is checked.
#define MEMSHUFFLE_LEAK_CHECK() \
  ::memshuffle::leak_check DOCTEST_ANONYMOUS(memshuffle_leak_check_)(::memshuffle::tracking_options{}, __FILE__, __LINE__)
