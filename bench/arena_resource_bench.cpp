// arena_resource against std's and boost's monotonic_buffer_resource, in one run:
// allocation of 8..256-byte blocks through the memory_resource interface, and reuse of
// an arena per unit of work (reset() + refill against destroying and re-creating).
#include <memshuffle/arena_resource.hpp>

#include <benchmark/benchmark.h>
#include <boost/container/pmr/global_resource.hpp>
#include <boost/container/pmr/monotonic_buffer_resource.hpp>

#include <malloc.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <map>
#include <memory_resource>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "goal_report.hpp"

namespace {

namespace bpmr = boost::container::pmr;
using memshuffle::arena_options;
using memshuffle::arena_resource;

constexpr std::size_t batch = 1024;  // allocations per iteration
constexpr std::size_t mixed = 0;     // size argument: random sizes in 8..256

// The sizes of one batch: all `size`, or a fixed random mix of 8..256 bytes.
const std::array<std::size_t, batch>& sizes_for(std::size_t size) {
  static std::array<std::size_t, batch> fixed, mix;
  static const bool ready = [] {
    std::mt19937 rng(42);
    for (auto& s : mix) s = 8 + rng() % 249;
    return true;
  }();
  (void)ready;
  if (size == mixed) return mix;
  fixed.fill(size);
  return fixed;
}

// Big enough for a batch of the largest blocks: the bump path alone, no upstream.
alignas(64) std::byte buffer[batch * 256 * 2];

template <class Resource, class Base>
void allocate_batch(benchmark::State& state, Resource& resource) {
  const auto& sizes = sizes_for(static_cast<std::size_t>(state.range(0)));
  Base* r = &resource;
  benchmark::DoNotOptimize(r);  // calls go through the virtual interface, as in containers
  for (auto _ : state) {
    for (std::size_t s : sizes) benchmark::DoNotOptimize(r->allocate(s, 8));
    resource.release();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * batch));
}

// Blocks from the caller's buffer: the hot path only.
void alloc_buffer_arena(benchmark::State& state) {
  arena_resource r(buffer, sizeof buffer, std::pmr::null_memory_resource());
  allocate_batch<arena_resource, std::pmr::memory_resource>(state, r);
}
void alloc_buffer_std(benchmark::State& state) {
  std::pmr::monotonic_buffer_resource r(buffer, sizeof buffer, std::pmr::null_memory_resource());
  allocate_batch<std::pmr::monotonic_buffer_resource, std::pmr::memory_resource>(state, r);
}
void alloc_buffer_boost(benchmark::State& state) {
  bpmr::monotonic_buffer_resource r(buffer, sizeof buffer, bpmr::null_memory_resource());
  allocate_batch<bpmr::monotonic_buffer_resource, bpmr::memory_resource>(state, r);
}

// Blocks from chunks of the default growth over new/delete, released after each batch.
void alloc_chunks_arena(benchmark::State& state) {
  arena_resource r(std::pmr::new_delete_resource());
  allocate_batch<arena_resource, std::pmr::memory_resource>(state, r);
}
void alloc_chunks_std(benchmark::State& state) {
  std::pmr::monotonic_buffer_resource r(std::pmr::new_delete_resource());
  allocate_batch<std::pmr::monotonic_buffer_resource, std::pmr::memory_resource>(state, r);
}
void alloc_chunks_boost(benchmark::State& state) {
  bpmr::monotonic_buffer_resource r(bpmr::new_delete_resource());
  allocate_batch<bpmr::monotonic_buffer_resource, bpmr::memory_resource>(state, r);
}

// One unit of work: a batch of mixed blocks from a fresh (or freshly reset) resource.
template <class Base>
void fill(Base* r) {
  benchmark::DoNotOptimize(r);
  for (std::size_t s : sizes_for(mixed)) benchmark::DoNotOptimize(r->allocate(s, 8));
}

void unit_arena_reset(benchmark::State& state) {
  arena_resource r(std::pmr::new_delete_resource());
  for (auto _ : state) {
    r.reset();
    fill<std::pmr::memory_resource>(&r);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * batch));
}
void unit_std_recreate(benchmark::State& state) {
  for (auto _ : state) {
    std::pmr::monotonic_buffer_resource r(std::pmr::new_delete_resource());
    fill<std::pmr::memory_resource>(&r);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * batch));
}
void unit_boost_recreate(benchmark::State& state) {
  for (auto _ : state) {
    bpmr::monotonic_buffer_resource r(bpmr::new_delete_resource());
    fill<bpmr::memory_resource>(&r);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * batch));
}

// Heavy-tailed units of work: 1000 units whose total sizes are lognormal (median
// 8 KiB, one in a hundred above 250 KiB), of 8..256-byte blocks. The same draw every run.
constexpr std::size_t units = 1000;
constexpr std::size_t retention_cap = 64 * 1024;

const std::vector<std::vector<std::size_t>>& heavy_units() {
  static const std::vector<std::vector<std::size_t>> all = [] {
    std::mt19937_64 rng(7);
    std::lognormal_distribution<double> total(9.0, 1.5);
    std::vector<std::vector<std::size_t>> out(units);
    for (auto& u : out) {
      auto left = static_cast<std::size_t>(std::min(total(rng), 4e6));
      while (left > 0) {
        const std::size_t n = std::min<std::size_t>(left, 8 + rng() % 249);
        u.push_back(n);
        left -= n;
      }
    }
    return out;
  }();
  return all;
}

template <class Base>
void fill_unit(Base* r, const std::vector<std::size_t>& unit) {
  benchmark::DoNotOptimize(r);
  for (std::size_t s : unit) benchmark::DoNotOptimize(r->allocate(s, 8));
}

// The arena reset after each unit, with `options`; counters: the most it held after a
// reset over the limit in force (the bar: 1.25 at most), and the mean it held, in KiB.
void heavy_arena(benchmark::State& state, const arena_options& options) {
  arena_resource r(options, std::pmr::new_delete_resource());
  double worst = 0, held = 0, resets = 0;
  for (auto _ : state) {
    for (const auto& unit : heavy_units()) {
      fill_unit<std::pmr::memory_resource>(&r, unit);
      r.reset();
      const auto st = r.stats();
      worst = std::max(worst, static_cast<double>(st.bytes_reserved) / static_cast<double>(st.retention_limit));
      held += static_cast<double>(st.bytes_reserved);
      ++resets;
    }
  }
  state.counters["reserved_over_limit"] = worst;
  state.counters["mean_reserved_kib"] = held / resets / 1024;
}
// A fixed cap.
void heavy_arena_capped(benchmark::State& state) {
  heavy_arena(state, arena_options{.reset_retention = retention_cap});
}
// The policy from recent units: what the most demanding of the last 16 needed.
void heavy_arena_window(benchmark::State& state) {
  heavy_arena(state, arena_options{.retention_window = 16});
}
void heavy_std_recreate(benchmark::State& state) {
  for (auto _ : state)
    for (const auto& unit : heavy_units()) {
      std::pmr::monotonic_buffer_resource r(std::pmr::new_delete_resource());
      fill_unit<std::pmr::memory_resource>(&r, unit);
    }
}

void block_sizes(benchmark::internal::Benchmark* b) {
  for (long s : {8L, 64L, 256L, static_cast<long>(mixed)}) b->Arg(s);
}

BENCHMARK(alloc_buffer_arena)->Apply(block_sizes);
BENCHMARK(alloc_buffer_std)->Apply(block_sizes);
BENCHMARK(alloc_buffer_boost)->Apply(block_sizes);
BENCHMARK(alloc_chunks_arena)->Apply(block_sizes);
BENCHMARK(alloc_chunks_std)->Apply(block_sizes);
BENCHMARK(alloc_chunks_boost)->Apply(block_sizes);
BENCHMARK(unit_arena_reset);
BENCHMARK(unit_std_recreate);
BENCHMARK(unit_boost_recreate);
BENCHMARK(heavy_arena_capped)->Unit(benchmark::kMillisecond);
BENCHMARK(heavy_arena_window)->Unit(benchmark::kMillisecond);
BENCHMARK(heavy_std_recreate)->Unit(benchmark::kMillisecond);

// Keeps wall-clock and CPU time per iteration: on a shared, loaded machine
// wall-clock time includes waiting for a core, CPU time does not; both ratios are
// printed.
class arena_reporter : public memshuffle::bench::goal_reporter {
 public:
  using goal_reporter::goal_reporter;
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs)
      if (!r.error_occurred && r.run_type == Run::RT_Iteration) {
        const std::string name =
            r.run_name.function_name + (r.run_name.args.empty() ? "" : "/" + r.run_name.args);
        const double to_ns = 1e9 / benchmark::GetTimeUnitMultiplier(r.time_unit);
        wall_[name] = r.GetAdjustedRealTime() * to_ns;
        cpu_[name] = r.GetAdjustedCPUTime() * to_ns;
      }
    goal_reporter::ReportRuns(runs);
  }
  std::optional<double> wall_ns(const std::string& name) const { return find(wall_, name); }
  std::optional<double> cpu_ns(const std::string& name) const { return find(cpu_, name); }

 private:
  static std::optional<double> find(const std::map<std::string, double>& m, const std::string& name) {
    auto it = m.find(name);
    if (it == m.end()) return std::nullopt;
    return it->second;
  }
  std::map<std::string, double> wall_, cpu_;
};

// Ratio of `ours` to `theirs` in wall-clock and in CPU time; the goal applies to both.
void print_ratio(const arena_reporter& r, const std::string& label, const std::string& ours,
                 const std::string& theirs, std::optional<memshuffle::bench::goal> g) {
  using memshuffle::bench::print_goal;
  using memshuffle::bench::ratio;
  print_goal((label + " (wall)").c_str(), ratio(r.wall_ns(ours), r.wall_ns(theirs)), "", g);
  print_goal((label + " (cpu)").c_str(), ratio(r.cpu_ns(ours), r.cpu_ns(theirs)), "", g);
}

void print_goals(const arena_reporter& r) {
  using memshuffle::bench::goal;
  std::printf("\nRatios of time per batch (arena / other; below 1 is faster), size 0 = mixed 8..256:\n");
  for (const char* where : {"buffer", "chunks"}) {
    for (const char* size : {"8", "64", "256", "0"}) {
      const std::string suffix = std::string("/") + size;
      const std::string ours = std::string("alloc_") + where + "_arena" + suffix;
      const std::string label = std::string(where) + ", size " + size + ": arena / ";
      print_ratio(r, label + "std", ours, std::string("alloc_") + where + "_std" + suffix, goal{1.0, true});
      print_ratio(r, label + "boost", ours, std::string("alloc_") + where + "_boost" + suffix, std::nullopt);
    }
  }
  print_ratio(r, "reset+refill / std re-create", "unit_arena_reset", "unit_std_recreate", goal{1.0, true});
  print_ratio(r, "reset+refill / boost re-create", "unit_arena_reset", "unit_boost_recreate", std::nullopt);
  for (const char* policy : {"capped", "window"}) {
    const std::string name = std::string("heavy_arena_") + policy;
    print_ratio(r, std::string("heavy-tailed units, ") + policy + " reset / std re-create", name,
                "heavy_std_recreate", goal{1.0, true});
    if (auto worst = r.counter(name, "reserved_over_limit"))
      memshuffle::bench::print_goal((std::string(policy) + ": reserved after reset / limit, worst of 1000 units").c_str(),
                                    *worst, "", goal{1.25, true});
    if (auto mean = r.counter(name, "mean_reserved_kib"))
      memshuffle::bench::print_goal((std::string(policy) + ": mean reserved after reset").c_str(), *mean, "KiB");
  }
  if (auto cpu = r.cpu_ns("unit_arena_reset"))
    memshuffle::bench::print_goal("reset+refill, cpu ns per block", *cpu / batch, "ns");
}

}  // namespace

int main(int argc, char** argv) {
  // glibc moves its mmap and trim thresholds as blocks come and go, so the cost of
  // re-creating a resource depended on which benchmarks ran before. Pinned high, no
  // chunk is ever mmapped or trimmed away: the cheapest case for re-creation.
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  arena_reporter reporter(memshuffle::bench::goal_reporter::options_from(argc, argv));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  print_goals(reporter);
  benchmark::Shutdown();
  return 0;
}
