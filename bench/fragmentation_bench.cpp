// The fragmentation scenario: one seeded churn of mixed sizes (16 B..16 KiB, log-uniform)
// whose live set swings between a low and a high mark, run on malloc, on
// std::pmr::unsynchronized_pool_resource and on the shuffler. What matters is the
// footprint each keeps for the same live bytes at the end, after the live set has
// shrunk from its peak: the shuffler can compact, the others can only reuse holes.
// --csv_dir=DIR also writes fragmentation.csv there: held and live bytes every 10,000
// operations for each allocator (scripts/plots draws it).
#include "goal_report.hpp"

#include <memshuffle/shuffler.hpp>


#include <benchmark/benchmark.h>
#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <memory_resource>
#include <random>
#include <vector>

namespace {

constexpr std::uint64_t seed = 20261122;
constexpr std::size_t operations = 1'000'000;
constexpr std::size_t low_mark = 4'000, high_mark = 16'000;  // live entries
constexpr std::size_t swings = 4;                            // low -> high -> low
constexpr double mib = 1024.0 * 1024.0;

// size != 0: allocate that many bytes; size == 0: free live entry number victim
// (the last live entry then takes its place).
struct op {
  std::uint32_t size;
  std::uint32_t victim;
};

// The same sequence for every allocator, generated once outside the timing.
const std::vector<op>& workload() {
  static const std::vector<op> ops = [] {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    std::vector<op> out;
    out.reserve(operations);
    std::size_t live = 0;
    const double period = double(operations) / swings;
    for (std::size_t i = 0; i < operations; ++i) {
      double phase = std::fmod(double(i), period) / period;  // 0..1
      double tri = phase < 0.5 ? 2 * phase : 2 - 2 * phase;  // 0..1..0
      auto target = static_cast<std::size_t>(low_mark + tri * double(high_mark - low_mark));
      bool grow = live == 0 || unit(rng) < (live < target ? 0.7 : 0.3);
      if (grow) {
        auto size = static_cast<std::uint32_t>(std::lround(16.0 * std::exp2(10.0 * unit(rng))));
        out.push_back({size, 0});
        ++live;
      } else {
        auto victim = static_cast<std::uint32_t>(rng() % live);
        out.push_back({0, victim});
        --live;
      }
    }
    return out;
  }();
  return ops;
}

// Held and live MiB every 10,000 operations, by allocator, for the CSV file.
std::string csv_dir;
struct sample_row {
  std::string allocator;
  std::size_t operation;
  double held_mib, live_mib;
};
std::vector<sample_row> samples;

struct live_entry {
  void* p;
  std::size_t size;
};

// Runs the workload through alloc/free callbacks; returns the live bytes at the end.
// sample(operation, live_bytes) is called every 10'000 operations.
template <class Entry, class Alloc, class Free, class Sample>
std::size_t run_workload(std::vector<Entry>& live, Alloc alloc, Free free, Sample sample) {
  std::size_t live_bytes = 0, i = 0;
  for (const op& o : workload()) {
    if (o.size != 0) {
      live.push_back(alloc(o.size));
      live_bytes += o.size;
    } else {
      Entry& e = live[o.victim];
      live_bytes -= e.size;
      free(e);
      e = live.back();
      live.pop_back();
    }
    if (++i % 10'000 == 0) sample(i, live_bytes);
  }
  return live_bytes;
}

// Counts what a resource holds from its upstream, now and at most.
class counting_resource : public std::pmr::memory_resource {
 public:
  std::size_t current = 0, peak = 0;

 private:
  void* do_allocate(std::size_t bytes, std::size_t align) override {
    void* p = std::pmr::new_delete_resource()->allocate(bytes, align);
    current += bytes;
    peak = std::max(peak, current);
    return p;
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t align) override {
    current -= bytes;
    std::pmr::new_delete_resource()->deallocate(p, bytes, align);
  }
  bool do_is_equal(const memory_resource& o) const noexcept override { return this == &o; }
};

void report(benchmark::State& state, std::size_t live_bytes, std::size_t held, std::size_t peak) {
  state.counters["live_MiB"] = double(live_bytes) / mib;
  state.counters["held_MiB"] = double(held) / mib;
  state.counters["peak_MiB"] = double(peak) / mib;
  state.counters["held/live"] = double(held) / double(live_bytes);
}

// malloc's footprint: what mallinfo2 says it got from the system (heap + mmapped),
// relative to before the run. It runs first, before the others used the heap.
std::size_t malloc_held() {
  struct mallinfo2 m = mallinfo2();
  return m.arena + m.hblkhd;
}

void BM_churn_malloc(benchmark::State& state) {
  for (auto _ : state) {
    std::vector<live_entry> live;
    live.reserve(operations);
    std::size_t before = malloc_held(), peak = 0;
    auto sample = [&](std::size_t i, std::size_t live_bytes) {
      const std::size_t held = malloc_held() - before;
      peak = std::max(peak, held);
      samples.push_back({"malloc", i, double(held) / mib, double(live_bytes) / mib});
    };
    std::size_t live_bytes = run_workload(
        live, [](std::size_t n) { return live_entry{std::malloc(n), n}; },
        [](live_entry& e) { std::free(e.p); }, sample);
    peak = std::max(peak, malloc_held() - before);
    report(state, live_bytes, malloc_held() - before, peak);
    for (auto& e : live) std::free(e.p);
  }
}
BENCHMARK(BM_churn_malloc)->Iterations(1)->Unit(benchmark::kMillisecond);

void BM_churn_std_pool(benchmark::State& state) {
  for (auto _ : state) {
    counting_resource upstream;
    std::pmr::unsynchronized_pool_resource pool(&upstream);
    std::vector<live_entry> live;
    live.reserve(operations);
    std::size_t live_bytes = run_workload(
        live, [&](std::size_t n) { return live_entry{pool.allocate(n), n}; },
        [&](live_entry& e) { pool.deallocate(e.p, e.size); },
        [&](std::size_t i, std::size_t live) {
          samples.push_back({"std pool", i, double(upstream.current) / mib, double(live) / mib});
        });
    report(state, live_bytes, upstream.current, upstream.peak);
    for (auto& e : live) pool.deallocate(e.p, e.size);
  }
}
BENCHMARK(BM_churn_std_pool)->Iterations(1)->Unit(benchmark::kMillisecond);

struct live_handle {
  memshuffle::handle h;
  std::size_t size;
};

// The shuffler compacts on its own when reserved/live passes the argument / 100 (its
// shuffle_above_ratio policy), and once more at the end; the footprint counted is the
// one after that last shuffle. A lower ratio trades time for a lower peak.
void BM_churn_shuffler(benchmark::State& state) {
  for (auto _ : state) {
    counting_resource upstream;
    memshuffle::shuffler s({.cipher = memshuffle::cipher_kind::none,
                            .shuffle_above_ratio = double(state.range(0)) / 100},
                           &upstream);
    std::vector<live_handle> live;
    live.reserve(operations);
    std::size_t live_bytes = run_workload(
        live, [&](std::size_t n) { return live_handle{s.alloc<std::byte>(n), n}; },
        [&](live_handle& e) { s.free(e.h); },
        [&](std::size_t i, std::size_t live) {
          samples.push_back({"shuffler ratio " + std::to_string(state.range(0) / 100.0).substr(0, 4), i,
                             double(upstream.current) / mib, double(live) / mib});
        });
    const auto before = s.stats();
    s.shuffle();
    const auto after = s.stats();
    report(state, live_bytes, upstream.current, upstream.peak);
    state.counters["reserved/live"] = double(after.reserved_bytes) / double(after.live_bytes);
    state.counters["before_shuffle"] = double(before.reserved_bytes) / double(before.live_bytes);
    state.counters["shuffles"] = double(after.shuffles);
    state.counters["shuffle_ms"] = double(after.shuffle_time.count()) / 1e6;
    // The policy's compactions alone: what they moved, and their time (wall clock).
    state.counters["moved_MiB"] = double(before.bytes_moved) / mib;
    state.counters["compaction_ms"] = double(before.shuffle_time.count()) / 1e6;
  }
}
BENCHMARK(BM_churn_shuffler)->ArgName("auto_ratio_pct")->Arg(200)->Arg(125)->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  csv_dir = memshuffle::bench::take_flag(argc, argv, "csv_dir");
  memshuffle::bench::goal_reporter reporter(memshuffle::bench::goal_reporter::options_from(argc, argv));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  std::printf("churn: %zu operations, seed %llu, sizes 16 B..16 KiB log-uniform, "
              "live entries swinging %zu..%zu %zu times\n",
              operations, static_cast<unsigned long long>(seed), low_mark, high_mark, swings);
  std::fflush(stdout);
  workload();  // generated here, so the first benchmark's time does not include it
  benchmark::RunSpecifiedBenchmarks(&reporter);

  using memshuffle::bench::goal;
  using memshuffle::bench::print_goal;
  using memshuffle::bench::ratio;
  const auto malloc_ns = reporter.ns("BM_churn_malloc");
  std::printf("\nfootprint held for the same live bytes at the end (held / live), peak, time:\n");
  for (const char* name : {"BM_churn_malloc", "BM_churn_std_pool", "BM_churn_shuffler/auto_ratio_pct:200",
                           "BM_churn_shuffler/auto_ratio_pct:125"}) {
    if (auto t = reporter.ns(name)) {
      print_goal(name, reporter.counter(name, "held/live"), "x");
      print_goal("  reserved/live after the last shuffle", reporter.counter(name, "reserved/live"), "x",
                 goal{1.10, true});
      print_goal("  peak held", reporter.counter(name, "peak_MiB"), "MiB");
      print_goal("  per operation (CPU)", *t / operations, "ns");
      if (std::strncmp(name, "BM_churn_shuffler", 17) == 0)
        print_goal("  per operation CPU / malloc's", ratio(t, malloc_ns), "x", goal{1.5, true});
    }
  }
  if (!csv_dir.empty()) {
    std::ofstream out(csv_dir + "/fragmentation.csv");
    out << "allocator,operation,held_MiB,live_MiB\n";
    for (const sample_row& r : samples)
      out << r.allocator << ',' << r.operation << ',' << r.held_mib << ',' << r.live_mib << '\n';
  }
  benchmark::Shutdown();
}
