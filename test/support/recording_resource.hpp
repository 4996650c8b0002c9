#pragma once
// The instrumented upstream of our tests: records every block it hands out (size and
// alignment), checks that every deallocation matches a live allocation exactly, can
// throw std::bad_alloc at a chosen allocation, and can keep freed blocks (without
// giving them back) so a test can scan all memory the code under test ever held.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <map>
#include <memory_resource>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <vector>

namespace memshuffle::testing {

class recording_resource : public std::pmr::memory_resource {
 public:
  struct block {
    void* p;
    std::size_t bytes;
    std::size_t alignment;
  };

  explicit recording_resource(std::pmr::memory_resource* upstream = std::pmr::new_delete_resource())
      : upstream_(upstream) {}
  recording_resource(const recording_resource&) = delete;
  recording_resource& operator=(const recording_resource&) = delete;

  ~recording_resource() override {
    for (auto& [p, b] : live_) upstream_->deallocate(p, b.bytes, b.alignment);
    for (auto& b : freed_) upstream_->deallocate(b.p, b.bytes, b.alignment);
  }

  // The (n+1)-th allocation from now throws std::bad_alloc; with once == false every
  // allocation from then on throws too. fail_never() turns it off.
  void fail_after(std::size_t n, bool once = true) {
    std::lock_guard lock(m_);
    countdown_ = static_cast<long long>(n);
    fail_once_ = once;
  }
  void fail_never() {
    std::lock_guard lock(m_);
    countdown_ = -1;
  }
  // Freed blocks are kept (not given back) until this resource dies, for scanning.
  void keep_freed(bool on) {
    std::lock_guard lock(m_);
    keep_freed_ = on;
  }

  std::size_t outstanding() const { std::lock_guard lock(m_); return live_.size(); }
  std::size_t outstanding_bytes() const {
    std::lock_guard lock(m_);
    std::size_t n = 0;
    for (auto& [p, b] : live_) n += b.bytes;
    return n;
  }
  std::size_t allocations() const { std::lock_guard lock(m_); return allocations_; }
  std::size_t deallocations() const { std::lock_guard lock(m_); return deallocations_; }
  std::size_t failures_injected() const { std::lock_guard lock(m_); return injected_; }
  // Deallocations that matched no live block, or matched one with another size or
  // alignment; they are not passed upstream.
  std::size_t mismatches() const { std::lock_guard lock(m_); return mismatches_.size(); }
  std::vector<std::string> mismatch_messages() const { std::lock_guard lock(m_); return mismatches_; }
  // Every block ever handed out, in order (also those since given back).
  std::vector<block> history() const { std::lock_guard lock(m_); return history_; }
  std::vector<block> live_blocks() const {
    std::lock_guard lock(m_);
    std::vector<block> out;
    for (auto& [p, b] : live_) out.push_back(b);
    return out;
  }

  // True when needle occurs in any live block, or in any kept freed block.
  bool contains(std::span<const std::byte> needle, bool include_freed = true) const {
    std::lock_guard lock(m_);
    for (auto& [p, b] : live_) if (block_contains(b, needle)) return true;
    if (include_freed)
      for (auto& b : freed_) if (block_contains(b, needle)) return true;
    return false;
  }

 protected:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    std::lock_guard lock(m_);
    if (countdown_ >= 0) {
      if (countdown_ == 0) {
        ++injected_;
        if (fail_once_) countdown_ = -1;
        throw std::bad_alloc();
      }
      --countdown_;
    }
    void* p = upstream_->allocate(bytes, alignment);
    // Tests also make operator new fail: then the bookkeeping throws, and the block
    // must go back rather than leak.
    try {
      if (history_.size() == history_.capacity()) history_.reserve(2 * history_.size() + 64);
      live_.emplace(p, block{p, bytes, alignment});
    } catch (...) {
      upstream_->deallocate(p, bytes, alignment);
      throw;
    }
    history_.push_back(block{p, bytes, alignment});
    ++allocations_;
    return p;
  }

  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    std::lock_guard lock(m_);
    auto it = live_.find(p);
    if (it == live_.end()) {
      mismatches_.push_back("deallocate of a pointer not handed out (or freed twice)");
      return;
    }
    if (it->second.bytes != bytes || it->second.alignment != alignment) {
      mismatches_.push_back("deallocate with size " + std::to_string(bytes) + "/" +
                            std::to_string(alignment) + " of a block of " +
                            std::to_string(it->second.bytes) + "/" +
                            std::to_string(it->second.alignment));
      return;
    }
    ++deallocations_;
    bool kept = false;
    if (keep_freed_) {
      try {
        freed_.push_back(it->second);
        kept = true;
      } catch (const std::bad_alloc&) {  // cannot keep it for scanning: give it back
      }
    }
    if (!kept) upstream_->deallocate(p, bytes, alignment);
    live_.erase(it);
  }

  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override {
    return this == &other;
  }

 private:
  // Reads memory the code under test may have poisoned for the address sanitizer on
  // purpose, so it is not instrumented (and uses no library call that would be).
#if defined(__clang__) || defined(__GNUC__)
  __attribute__((no_sanitize_address))
#endif
  static bool block_contains(const block& b, std::span<const std::byte> needle) {
    auto* first = static_cast<const unsigned char*>(b.p);
    auto* want = reinterpret_cast<const unsigned char*>(needle.data());
    if (needle.empty()) return true;
    for (std::size_t i = 0; i + needle.size() <= b.bytes; ++i) {
      std::size_t k = 0;
      while (k < needle.size() && first[i + k] == want[k]) ++k;
      if (k == needle.size()) return true;
    }
    return false;
  }

  std::pmr::memory_resource* upstream_;
  mutable std::mutex m_;
  std::map<void*, block> live_;
  std::vector<block> freed_;
  std::vector<block> history_;
  std::vector<std::string> mismatches_;
  std::size_t allocations_ = 0, deallocations_ = 0, injected_ = 0;
  long long countdown_ = -1;
  bool fail_once_ = true;
  bool keep_freed_ = false;
};

}  // namespace memshuffle::testing
