#pragma once
// exception_test: runs a piece of code with its first, then its second, ... allocation
// failing, until it runs through without a failure, and after each failing run checks
// that it left nothing allocated (what BSLMA_TESTALLOCATOR_EXCEPTION_TEST_BEGIN/END
// does for BDE's tests). The failures come from a tracking_resource (fail_after), or
// from any source a test wires up itself (a global operator new, say).
//
//   memshuffle::tracking_resource r;
//   auto result = memshuffle::exception_test(r, [&] {
//     std::pmr::vector<std::pmr::string> v(&r);
//     v.emplace_back("a string too long for the small buffer");
//   });
//   assert(result.completed && result.leaks.empty());
//
// memshuffle/doctest.hpp has the doctest form, MEMSHUFFLE_EXCEPTION_TEST.
#include <memshuffle/tracking_resource.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace memshuffle {

/// Where failures are injected, and where leaks are looked for.
struct failure_injection {
  std::function<void(std::size_t n)> fail_after;  ///< the n-th allocation from now fails, once
  std::function<void()> fail_never;                ///< cancels fail_after
  std::function<std::size_t()> failures_injected;  ///< a count that rises with each failure
  tracking_resource* leak_check = nullptr;         ///< checked after each failed run, when set
};

/// \returns The injection of `r`'s own fail_after(), with leaks checked on `r`.
inline failure_injection inject_into(tracking_resource& r) {
  return {[&r](std::size_t n) { r.fail_after(n); }, [&r] { r.fail_never(); },
          [&r] { return r.stats().injected_failures; }, &r};
}

/// How exception_test() runs, and the hooks it calls between runs.
///
/// The hooks are called with failures off, with the number of the allocation that
/// fails (0: the first): before each run, after a run that threw the injected
/// std::bad_alloc, and after a run that completed. A test checks its strong guarantee
/// in them.
struct exception_test_options {
  std::size_t max_runs = 100000;  ///< gives up (completed == false) after this many
  std::function<void(std::size_t)> before_run;        ///< before each run
  std::function<void(std::size_t)> after_failure;     ///< after a run that threw the injected failure
  std::function<void(std::size_t)> after_completion;  ///< after a run that completed
};

/// A failed run that left allocations behind: they were made during the run and are
/// still live after it threw.
struct exception_test_leak {
  std::size_t failing_allocation = 0;     ///< the number of the allocation that failed (0: the first)
  std::vector<allocation_record> blocks;  ///< the blocks left live
};

/// What exception_test() found.
struct exception_test_result {
  std::size_t runs = 0;           ///< every run, the last one included
  std::size_t failed_runs = 0;    ///< runs that ended in the injected std::bad_alloc
  std::size_t absorbed_runs = 0;  ///< runs that completed although an allocation failed
  bool completed = false;         ///< a run went through with no failure injected
  std::vector<exception_test_leak> leaks;  ///< one entry per failed run that leaked
};

/// \effects Runs `body` (callable with no argument or with the failing allocation's
/// number) with allocation 0, 1, 2, ... of `source` failing, until a run injects no
/// failure or `options.max_runs` runs were made. After each run that threw the injected
/// std::bad_alloc, looks for leaks in `source.leak_check`.
/// \returns What happened, run by run counts and the leaks found.
/// \throws Whatever `body` throws other than the injected std::bad_alloc (a
/// std::bad_alloc nobody injected included), after turning failures off.
template <class Body>
exception_test_result exception_test(const failure_injection& source, Body&& body,
                                     const exception_test_options& options = {}) {
  exception_test_result result;
  const auto hook = [](const std::function<void(std::size_t)>& f, std::size_t n) {
    if (f) f(n);
  };
  for (std::size_t n = 0; n < options.max_runs; ++n) {
    hook(options.before_run, n);
    const std::size_t injected_before = source.failures_injected();
    const std::uint64_t sequence_before =
        source.leak_check != nullptr ? source.leak_check->stats().total_allocations : 0;
    ++result.runs;
    bool threw = false;
    source.fail_after(n);
    try {
      if constexpr (std::is_invocable_v<Body&, std::size_t>)
        body(n);
      else
        body();
    } catch (const std::bad_alloc&) {
      source.fail_never();
      if (source.failures_injected() == injected_before) throw;  // not ours
      threw = true;
    } catch (...) {
      source.fail_never();
      throw;
    }
    source.fail_never();
    const bool injected = source.failures_injected() != injected_before;
    if (!threw) {
      hook(options.after_completion, n);
      if (!injected) {
        result.completed = true;
        return result;
      }
      ++result.absorbed_runs;
      continue;
    }
    ++result.failed_runs;
    if (source.leak_check != nullptr) {
      exception_test_leak leak{n, {}};
      for (const auto& r : source.leak_check->live_allocations())
        if (r.sequence > sequence_before) leak.blocks.push_back(r);
      if (!leak.blocks.empty()) result.leaks.push_back(std::move(leak));
    }
    hook(options.after_failure, n);
  }
  return result;
}

/// \effects exception_test(inject_into(resource), body, options).
template <class Body>
exception_test_result exception_test(tracking_resource& resource, Body&& body,
                                     const exception_test_options& options = {}) {
  return exception_test(inject_into(resource), std::forward<Body>(body), options);
}

}  // namespace memshuffle
