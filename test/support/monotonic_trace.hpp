#pragma once
// A fixed script of operations on a monotonic_buffer_resource-like class, written down
// as what a caller sees and what the standard promises, not as one library's layout
// (libc++ fills its chunks downward, libstdc++ upward, and they grow differently):
// whether each block is aligned, inside the caller's buffer or a live upstream block,
// fresh or overlapping one handed out before since the last release(); how many
// upstream calls each step made (at most one allocation, never a deallocation outside
// release); whether an exception was the upstream's own (the step is then retried);
// whether release() gave everything back.
//
// Standard C++ only: the same header builds against libstdc++ (test/arena_resource_std)
// and against libc++ (test/libcxx_monotonic_trace.cpp), and the traces are compared.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "test/support/page_aligned_resource.hpp"
#include "test/support/recording_resource.hpp"

namespace memshuffle::testing {

// One run of the script: the resource is built by `make(buffer, size, upstream)`.
struct trace_config {
  std::uint64_t seed;
  std::size_t buffer_size;  // 0: no buffer; the initial size is then `initial`
  std::size_t initial;
};

class monotonic_tracer {
 public:
  template <class Make>
  std::string run(const trace_config& c, Make make) {
    // Page-aligned buffer and blocks: whether an aligned request fits a chunk's rest
    // must not depend on where the heap put it.
    void* buffer = c.buffer_size ? pages_.allocate(c.buffer_size) : nullptr;
    buffer_ = {reinterpret_cast<std::uintptr_t>(buffer), c.buffer_size};
    {
      auto r = make(buffer, c.buffer_size, c.initial, &up_);
      std::mt19937_64 rng(c.seed);
      for (int step = 0; step < 600; ++step) one_step(*r, rng);
    }
    if (buffer) pages_.deallocate(buffer, c.buffer_size);
    out_ += "destroyed: " + given_back() + "\n";
    return out_;
  }

 private:
  using range = std::pair<std::uintptr_t, std::size_t>;

  template <class Resource>
  void one_step(Resource& r, std::mt19937_64& rng) {
    const auto pick = rng() % 40;
    const std::size_t before_alloc = up_.allocations(), before_free = up_.deallocations();
    bool may_free = false;  // only release() gives blocks back (how many: the layout's)
    if (pick < 24 || handed_.empty()) {
      allocate(r, rng);
    } else if (pick < 38) {
      const auto& [p, bytes] = handed_[rng() % handed_.size()];
      r.deallocate(reinterpret_cast<void*>(p), bytes);
      out_ += "deallocate";
    } else {
      r.release();
      handed_.clear();
      may_free = true;
      out_ += "release: " + given_back();
    }
    out_ += "; upstream allocations " + std::string(up_.allocations() - before_alloc <= 1 ? "<= 1" : "> 1");
    if (!may_free && up_.deallocations() != before_free) out_ += ", UPSTREAM DEALLOCATIONS";
    out_ += "\n";
  }

  template <class Resource>
  void allocate(Resource& r, std::mt19937_64& rng) {
    const std::size_t bytes = rng() % 8 == 0 ? rng() % 3000 : rng() % 64;
    const std::size_t alignment = std::size_t{1} << (rng() % 7);
    if (rng() % 4 == 0) up_.fail_after(0);  // refused if asked at this step
    out_ += "allocate " + std::to_string(bytes) + " at " + std::to_string(alignment) + ": ";
    const std::size_t refused = up_.failures_injected();
    std::string failure;
    void* p = nullptr;
    try {
      p = r.allocate(bytes, alignment);
    } catch (const std::bad_alloc&) {
      // Whether the upstream was asked at this step depends on the library's chunk
      // sizes; that only the upstream's own failure comes out does not.
      failure = up_.failures_injected() != refused ? ", after the upstream's bad_alloc" : ", after A BAD_ALLOC OF ITS OWN";
      up_.fail_never();
      p = r.allocate(bytes, alignment);
    }
    up_.fail_never();
    const auto at = reinterpret_cast<std::uintptr_t>(p);
    out_ += describe({at, bytes}, alignment) + failure;
    handed_.emplace_back(at, bytes);
  }

  std::string describe(range b, std::size_t alignment) const {
    std::string s = b.first % alignment == 0 ? "aligned" : "MISALIGNED";
    s += inside(b) ? ", inside" : ", OUTSIDE";
    for (const auto& h : handed_)
      if (overlap(b, h)) return s + ", REUSED";
    return s + ", fresh";
  }

  bool inside(range b) const {
    if (within(b, buffer_)) return true;
    for (const auto& blk : up_.live_blocks())
      if (within(b, {reinterpret_cast<std::uintptr_t>(blk.p), blk.bytes})) return true;
    return false;
  }
  static bool within(range b, range outer) {
    return b.first >= outer.first && b.first + b.second <= outer.first + outer.second;
  }
  // Zero-byte blocks count as one byte: std gives distinct pointers for them.
  static bool overlap(range a, range b) {
    return a.first < b.first + std::max<std::size_t>(b.second, 1) &&
           b.first < a.first + std::max<std::size_t>(a.second, 1);
  }

  std::string given_back() const { return up_.outstanding() == 0 ? "all given back" : "BLOCKS KEPT"; }

  page_aligned_resource pages_;
  recording_resource up_{&pages_};
  range buffer_{};
  std::vector<range> handed_;  // since the last release()
  std::string out_;
};

}  // namespace memshuffle::testing
