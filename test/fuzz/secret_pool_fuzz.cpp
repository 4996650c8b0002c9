// Fuzzes secret_pool_resource: the input is decoded into allocations of every size
// class and of pages of their own, frees, bad frees (inside a block, a bad alignment,
// a foreign pointer) and allocations with a refused kernel call. After every one each
// live block must still hold its own pattern, be aligned and overlap no other, a new
// block must read as zeros (every freed block was wiped), and the statistics must
// match a model exactly.
#include <memshuffle/secret_pool_resource.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <new>
#include <vector>

#include "lib/secret_pages.hpp"
#include "test/fuzz/fuzz_check.hpp"

namespace {

using memshuffle::fuzz::fill_pattern;
using memshuffle::fuzz::has_pattern;
using memshuffle::secret_pool_resource;

struct block {
  std::byte* p;
  std::size_t bytes, alignment;
  std::uint32_t seed;
};

const std::size_t page = memshuffle::detail::page_size();

bool on_own_pages(const block& b) {
  return std::max(b.bytes, b.alignment) > secret_pool_resource::largest_class;
}

std::size_t footprint(const block& b) { return std::max<std::size_t>(b.bytes, 1); }

struct model {
  std::vector<block> live;
  std::size_t total = 0, bad = 0;

  void check(const secret_pool_resource& pool) const {
    const auto s = pool.stats();
    const auto large = static_cast<std::size_t>(std::count_if(live.begin(), live.end(), on_own_pages));
    std::size_t large_bytes = 0;
    for (const auto& b : live)
      if (on_own_pages(b)) large_bytes += ((footprint(b) + page - 1) / page + 2) * page;
    FUZZ_CHECK(s.large_allocations == large);
    FUZZ_CHECK(s.blocks == live.size() - large);
    FUZZ_CHECK(s.total_allocations == total);
    FUZZ_CHECK(s.bad_deallocations == bad);
    FUZZ_CHECK(s.bytes_mapped == s.runs * 3 * page + large_bytes + s.spare_large_bytes);  // runs of one page
    for (const auto& b : live) FUZZ_CHECK(has_pattern({b.p, b.bytes}, b.seed));
  }

  void check_new(const block& b) const {
    FUZZ_CHECK(reinterpret_cast<std::uintptr_t>(b.p) % b.alignment == 0);
    for (std::size_t i = 0; i < b.bytes; ++i) FUZZ_CHECK(b.p[i] == std::byte{0});
    for (const auto& o : live) FUZZ_CHECK(b.p + footprint(b) <= o.p || o.p + footprint(o) <= b.p);
  }
};

std::size_t pick_size(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange(0, 9)) {
    case 0: return 0;
    case 1: return in.ConsumeIntegralInRange<std::size_t>(1025, 3 * 4096);
    default: return in.ConsumeIntegralInRange<std::size_t>(1, 1024);
  }
}

void allocate(secret_pool_resource& pool, model& m, FuzzedDataProvider& in, long refuse_at) {
  block b{nullptr, pick_size(in), std::size_t{1} << in.ConsumeIntegralInRange(0, 12),
          in.ConsumeIntegral<std::uint32_t>()};
  memshuffle::detail::inject_page_fault(refuse_at);
  try {
    b.p = static_cast<std::byte*>(pool.allocate(b.bytes, b.alignment));
  } catch (const std::bad_alloc&) {
  }
  memshuffle::detail::inject_page_fault(-1);
  if (b.p == nullptr) return;   // refused: the model says nothing changed
  ++m.total;
  m.check_new(b);
  fill_pattern({b.p, b.bytes}, b.seed);
  m.live.push_back(b);
}

void free_one(secret_pool_resource& pool, model& m, std::size_t i) {
  const block b = m.live[i];
  m.live.erase(m.live.begin() + static_cast<std::ptrdiff_t>(i));
  pool.deallocate(b.p, b.bytes, b.alignment);
}

void bad_free(secret_pool_resource& pool, model& m, FuzzedDataProvider& in) {
  static int foreign = 0;
  if (m.live.empty() || in.ConsumeBool()) {
    pool.deallocate(&foreign, sizeof foreign);
  } else {
    const block& b = m.live[in.ConsumeIntegralInRange<std::size_t>(0, m.live.size() - 1)];
    if (in.ConsumeBool()) pool.deallocate(b.p + 1, b.bytes, b.alignment);
    else pool.deallocate(b.p, b.bytes, 3);
  }
  ++m.bad;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const bool secret = memshuffle::detail::secret_memory_supported() && in.ConsumeBool();
  const auto policy = in.ConsumeBool() ? memshuffle::on_lock_refused::degrade
                                       : memshuffle::on_lock_refused::fail;
  secret_pool_resource pool({.backend = secret ? memshuffle::secret_backend::secret_memory
                                               : memshuffle::secret_backend::locked_pages,
                             .lock_refused = policy,
                             .run_pages = 1});
  model m;
  while (in.remaining_bytes() > 0 && m.live.size() < 400) {
    switch (in.ConsumeIntegralInRange(0, 5)) {
      case 0: case 1: allocate(pool, m, in, -1); break;
      case 2: allocate(pool, m, in, in.ConsumeIntegralInRange<long>(0, 8)); break;
      case 3: case 4:
        if (!m.live.empty())
          free_one(pool, m, in.ConsumeIntegralInRange<std::size_t>(0, m.live.size() - 1));
        break;
      default: bad_free(pool, m, in); break;
    }
    m.check(pool);
  }
  while (!m.live.empty()) free_one(pool, m, m.live.size() - 1);
  m.check(pool);
  FUZZ_CHECK(pool.stats().runs <= 8);   // at most the one empty run kept per class
  return 0;
}
