// The memshuffle demo (scripts/demo): the pmr resources under ordinary containers,
// then the shuffler's handles, leases and compaction, then encryption at rest.
#include <memshuffle/arena_resource.hpp>
#include <memshuffle/resource_adaptors.hpp>
#include <memshuffle/tracking_resource.hpp>

#include <boost/container/pmr/deque.hpp>
#include <boost/container/pmr/map.hpp>
#include <boost/container/pmr/vector.hpp>

#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <memory_resource>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using namespace memshuffle;

void heading(const char* title) { std::printf("\n== %s ==\n", title); }

// ---- 1. pmr resources -------------------------------------------------------------

constexpr int elements = 100'000;

// Fills one container through `fill`, from a fresh arena over a tracking_resource,
// and prints what the arena saw (the container's requests) beside what the tracking
// resource saw (the arena's chunks).
void fill_and_report(const char* what, const std::function<void(std::pmr::memory_resource*)>& fill) {
  tracking_resource upstream(std::pmr::new_delete_resource());
  {
    arena_resource arena(&upstream);
    fill(&arena);
    arena_stats a = arena.stats();
    tracking_stats t = upstream.stats();
    std::printf("  %-38s %7zu %9zu %6zu | %6zu %9zu %6.2f\n", what, a.allocations,
                a.peak_bytes_used, a.chunks, t.total_allocations, t.peak_bytes,
                double(t.peak_bytes) / double(a.peak_bytes_used));
  }
  if (upstream.has_leaks()) upstream.report(std::cout);
}

void pmr_containers() {
  heading("1. std::pmr and boost::container::pmr containers on an arena_resource");
  std::printf("Each container gets %d elements from its own arena_resource, which takes\n"
              "its chunks from a tracking_resource over new/delete (boost containers through\n"
              "boost_resource_adaptor). Left: what the arena served; right: what it took.\n\n",
              elements);
  std::printf("  %-38s %-24s | %s\n", "", "arena_resource served", "tracking_resource saw");
  std::printf("  %-38s %7s %9s %6s | %6s %9s %6s\n", "container", "allocs", "peak used", "chunks",
              "allocs", "peak held", "held/used");
  fill_and_report("std::pmr::vector<int>", [](std::pmr::memory_resource* r) {
    std::pmr::vector<int> v(r);
    for (int i = 0; i < elements; ++i) v.push_back(i);
  });
  fill_and_report("std::pmr::map<int, pmr::string>", [](std::pmr::memory_resource* r) {
    std::pmr::map<int, std::pmr::string> m(r);
    for (int i = 0; i < elements; ++i) m.emplace(i, "value number " + std::to_string(i));
  });
  fill_and_report("std::pmr::unordered_map<int, int>", [](std::pmr::memory_resource* r) {
    std::pmr::unordered_map<int, int> m(r);
    for (int i = 0; i < elements; ++i) m.emplace(i, i);
  });
  fill_and_report("boost::container::pmr::vector<int>", [](std::pmr::memory_resource* r) {
    boost_resource_adaptor bridge(r);
    boost::container::pmr::vector<int> v(&bridge);
    for (int i = 0; i < elements; ++i) v.push_back(i);
  });
  fill_and_report("boost::container::pmr::map<int, int>", [](std::pmr::memory_resource* r) {
    boost_resource_adaptor bridge(r);
    boost::container::pmr::map<int, int> m(&bridge);
    for (int i = 0; i < elements; ++i) m.emplace(i, i);
  });
  fill_and_report("boost::container::pmr::deque<int>", [](std::pmr::memory_resource* r) {
    boost_resource_adaptor bridge(r);
    boost::container::pmr::deque<int> d(&bridge);
    for (int i = 0; i < elements; ++i) d.push_back(i);
  });

  // The per-request pattern: one arena, reset() between units of work. After the
  // first unit it has grown to the work's size and the upstream is not asked again.
  tracking_resource upstream(std::pmr::new_delete_resource());
  arena_resource arena(&upstream);
  std::printf("\nOne arena reused with reset() for 5 units of work (a vector of %d ints each):\n",
              elements);
  for (int unit = 1; unit <= 5; ++unit) {
    {
      std::pmr::vector<int> v(&arena);
      for (int i = 0; i < elements; ++i) v.push_back(i);
    }
    std::printf("  after unit %d: chunks taken from upstream so far %zu, bytes held %zu\n", unit,
                upstream.stats().total_allocations, upstream.stats().current_bytes);
    arena.reset();
  }
  arena.release();
  std::printf("  after release(): bytes held %zu, leaks: %s\n", upstream.stats().current_bytes,
              upstream.has_leaks() ? "yes" : "none");
}

}  // namespace

int main() {
  std::printf("memshuffle demo\n");
  pmr_containers();
}
