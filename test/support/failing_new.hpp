#pragma once
// A replacement global operator new that fails on demand, for the tests that must see
// what happens when memory the library asks for itself (not from its upstream) runs
// out. Linked into a test binary by listing failing_new.cpp with it in test/meson.build.
#include <cstddef>

namespace memshuffle::testing::failing_new {

// The n-th operator new from now on (0: the next one) throws std::bad_alloc, once;
// -1: none does.
void fail_at(long n) noexcept;
// While set, every operator new of at least `bytes` throws; 0 turns it off.
void refuse_from(std::size_t bytes) noexcept;
// How many failures were injected so far.
long failures() noexcept;

// Refuses large requests for as long as it lives.
class scoped_refusal {
 public:
  explicit scoped_refusal(std::size_t bytes) noexcept { refuse_from(bytes); }
  ~scoped_refusal() { refuse_from(0); }
  scoped_refusal(const scoped_refusal&) = delete;
  scoped_refusal& operator=(const scoped_refusal&) = delete;
};

}  // namespace memshuffle::testing::failing_new
