#pragma once
// doctest helpers for users' test suites:
//
// - MEMSHUFFLE_LEAK_CHECK(): one test case fails when it leaks memory, or deallocates
//   badly, through the default std::pmr resource.
//
//     TEST_CASE("a parser frees what it allocates") {
//       MEMSHUFFLE_LEAK_CHECK();
//       std::pmr::vector<int> v{1, 2, 3};   // uses the default resource
//     }
//
// - MEMSHUFFLE_LEAK_CHECK_EVERY_TEST_CASE(options): once, at namespace scope in one
//   file of a suite, and every test case of it is checked so. With
//   `.capture_stacks = true` the failure names the line that allocated the leak.
//
// - MEMSHUFFLE_EXCEPTION_TEST(resource) { ... };: the body runs with the first, the
//   second, ... allocation through `resource` failing until it runs through; each
//   failing run that leaks is a failed check.
//
//     TEST_CASE("push_back is exception safe") {
//       memshuffle::tracking_resource r;
//       MEMSHUFFLE_EXCEPTION_TEST(r) {
//         std::pmr::vector<std::pmr::string> v(&r);
//         v.emplace_back(100, 'x');
//       };
//     }
//
// The names live in namespace memshuffle (not memshuffle::doctest) so that a test file
// with `using namespace memshuffle;` still sees doctest's own `doctest::` unambiguously.
#include <doctest/doctest.h>
#include <memshuffle/exception_test.hpp>
#include <memshuffle/tracking_resource.hpp>

#include <memory_resource>
#include <optional>
#include <set>
#include <string>

namespace memshuffle {

namespace detail {

// A file name that outlives any report made with it (doctest keeps the pointer).
inline const char* lasting(const std::string& s) {
  static std::set<std::string> names;
  return names.insert(s).first->c_str();
}

}  // namespace detail

/// RAII: installs a tracking_resource (over the current default) as the default
/// resource; when the scope ends it restores the previous default and, if anything
/// allocated in the scope is still live or any deallocation was bad, fails the current
/// test case with the report, at the line that allocated the first leak when stacks are
/// captured (at the scope's own line otherwise). Leaked blocks are then given back, so
/// one failing test does not leave memory behind for the rest of the run or for
/// LeakSanitizer. Everything allocated inside the scope must be freed before it ends:
/// declare it first in the test case.
class leak_check {
 public:
  /// \effects Installs a tracking resource with `options` over the current default as
  /// the default resource; `file` and `line` are where a failure is reported without
  /// captured stacks.
  /// \throws std::bad_alloc, the default resource then unchanged.
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

  /// \effects Restores the previous default; fails the test case on a leak or a bad
  /// deallocation, then gives leaked blocks back.
  ~leak_check() { finish(); }

  /// \effects What the destructor does, now; the destructor then does nothing.
  /// \returns Whether a failure was reported.
  bool finish() {
    if (finished_) return false;
    finished_ = true;
    std::pmr::set_default_resource(previous_);
    const std::string message = failure_message();
    if (message.empty()) return false;
    const char* file = file_;
    int line = line_;
    const auto sites = tracking_.leak_sites();
    if (!sites.empty() && sites.front().line != 0) {
      file = detail::lasting(sites.front().file);
      line = static_cast<int>(sites.front().line);
    }
    DOCTEST_ADD_FAIL_CHECK_AT(file, line, message);
    tracking_.release_leaks();
    return true;
  }

  /// \returns The tracking resource installed as the default.
  tracking_resource& resource() noexcept { return tracking_; }

  /// \returns The text the scope would fail with if it ended now; empty when clean.
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
  bool finished_ = false;
};

namespace detail {

// The options of MEMSHUFFLE_LEAK_CHECK_EVERY_TEST_CASE.
inline tracking_options& every_test_case_options() {
  static tracking_options options;
  return options;
}

// A doctest listener: a leak_check around every test case. Its failure arrives after
// doctest has tallied the test case, so the listener (which runs before the reporters)
// tallies it again the way doctest does, and corrects the run's totals at its end.
// Why the const_casts: doctest 2.4.9 has no hook between the last run of a test case's
// body and its tally (test_case_reenter comes only between subcase runs, and a listener
// cannot wrap the registered function), and what it passes as const is its own
// non-const state, so writing through the cast is defined behaviour.
class leak_check_listener : public doctest::IReporter {
 public:
  explicit leak_check_listener(const doctest::ContextOptions&) {}

  void test_case_start(const doctest::TestCaseData& tc) override {
    test_case_ = &tc;
    check_.emplace(every_test_case_options(), tc.m_file.c_str(), static_cast<int>(tc.m_line));
  }
  void test_case_end(const doctest::CurrentTestCaseStats& in) override {
    if (!check_) return;
    const bool failed = check_->finish();
    check_.reset();
    if (failed) retally(const_cast<doctest::CurrentTestCaseStats&>(in));
  }
  void test_run_end(const doctest::TestRunStats& in) override {
    auto& run = const_cast<doctest::TestRunStats&>(in);
    run.numAsserts += added_asserts_;
    run.numAssertsFailed += added_asserts_;
    run.numTestCasesFailed = static_cast<unsigned>(static_cast<long>(run.numTestCasesFailed) + failed_delta_);
  }

  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}

 private:
  // One more failed assertion, and the test case's outcome decided again with its
  // decorators, as doctest decides it.
  void retally(doctest::CurrentTestCaseStats& st) {
    namespace reason = doctest::TestCaseFailureReason;
    const bool was_success = st.testCaseSuccess;
    ++st.numAssertsCurrentTest;
    ++st.numAssertsFailedCurrentTest;
    ++added_asserts_;
    int flags = st.failure_flags | reason::AssertFailure;
    flags &= ~(reason::ShouldHaveFailedButDidnt | reason::DidntFailExactlyNumTimes |
               reason::FailedExactlyNumTimes);
    if (test_case_->m_should_fail) {
      flags |= reason::ShouldHaveFailedAndDid;
    } else if (test_case_->m_may_fail) {
      flags |= reason::CouldHaveFailedAndDid;
    } else if (test_case_->m_expected_failures > 0) {
      flags |= st.numAssertsFailedCurrentTest == test_case_->m_expected_failures
                   ? reason::FailedExactlyNumTimes
                   : reason::DidntFailExactlyNumTimes;
    }
    const bool ok_to_fail = (flags & (reason::ShouldHaveFailedAndDid |
                                      reason::CouldHaveFailedAndDid |
                                      reason::FailedExactlyNumTimes)) != 0;
    st.failure_flags = flags;
    st.testCaseSuccess = !(flags != 0 && !ok_to_fail);
    if (was_success && !st.testCaseSuccess) ++failed_delta_;
    if (!was_success && st.testCaseSuccess) --failed_delta_;
  }

  const doctest::TestCaseData* test_case_ = nullptr;
  std::optional<leak_check> check_;
  int added_asserts_ = 0;
  long failed_delta_ = 0;
};

// Runs an exception test and turns what it found into doctest failures at file:line.
class doctest_exception_test {
 public:
  doctest_exception_test(tracking_resource& r, const char* file, int line)
      : resource_(r), file_(file), line_(line) {}

  /// \effects exception_test(resource, body); a failed check for each failing run that
  /// leaked, and for a body that never ran through.
  /// \returns What exception_test returned.
  template <class Body>
  exception_test_result operator*(Body&& body) {
    const auto result = exception_test(resource_, std::forward<Body>(body));
    for (const auto& leak : result.leaks) {
      std::size_t bytes = 0;
      for (const auto& b : leak.blocks) bytes += b.bytes;
      const std::string message =
          "with allocation #" + std::to_string(leak.failing_allocation + 1) + " failing, " +
          std::to_string(leak.blocks.size()) + " blocks (" + std::to_string(bytes) +
          " bytes) leaked";
      DOCTEST_ADD_FAIL_CHECK_AT(file_, line_, message);
    }
    if (!result.completed)
      DOCTEST_ADD_FAIL_CHECK_AT(file_, line_, "the exception test never ran through");
    return result;
  }

 private:
  tracking_resource& resource_;
  const char* file_;
  int line_;
};

}  // namespace detail

}  // namespace memshuffle

// One line at the top of a test case: the whole case is checked.
#define MEMSHUFFLE_LEAK_CHECK() \
  ::memshuffle::leak_check DOCTEST_ANONYMOUS(memshuffle_leak_check_)(::memshuffle::tracking_options{}, __FILE__, __LINE__)

// Once per suite, at namespace scope: every test case is leak checked. The arguments
// are tracking_options designated initializers, e.g. (.capture_stacks = true).
#define MEMSHUFFLE_LEAK_CHECK_EVERY_TEST_CASE(...)                                          \
  static const bool DOCTEST_ANONYMOUS(memshuffle_every_test_case_) =                       \
      (::memshuffle::detail::every_test_case_options() = ::memshuffle::tracking_options{__VA_ARGS__}, \
       true);                                                                               \
  DOCTEST_REGISTER_LISTENER("memshuffle_leak_check", 1, ::memshuffle::detail::leak_check_listener)

// MEMSHUFFLE_EXCEPTION_TEST(resource) { body; };  The body may use
// memshuffle_failing_allocation, the number of the allocation that fails in this run.
// The statement's value is the exception_test_result (do not cast it to void: the cast
// would bind before the body).
#define MEMSHUFFLE_EXCEPTION_TEST(resource)                                          \
  ::memshuffle::detail::doctest_exception_test(resource, __FILE__, __LINE__) *       \
      [&]([[maybe_unused]] std::size_t memshuffle_failing_allocation)
