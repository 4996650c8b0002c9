// tracking_resource's overhead over its upstream, measured in the same run through
// the memory_resource interface. Goals: under 2x for 64-byte blocks on one thread;
// within 2.5x with two threads sharing one resource (--with_threads). After the run a
// table prints each tracked variant's time over its raw upstream's.
#include <benchmark/benchmark.h>
#include <memshuffle/tracking_resource.hpp>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory_resource>
#include <string>
#include <vector>

namespace {

constexpr std::size_t block = 64;
constexpr std::size_t batch_size = 1000;

// One allocation freed at once: the lowest-latency path of every resource.
void pairs(benchmark::State& state, std::pmr::memory_resource* r) {
  for (auto _ : state) {
    void* p = r->allocate(block, alignof(std::max_align_t));
    benchmark::DoNotOptimize(p);
    r->deallocate(p, block, alignof(std::max_align_t));
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

// A thousand live blocks, then all freed: the tracking table holds many entries.
void batch(benchmark::State& state, std::pmr::memory_resource* r) {
  std::vector<void*> blocks(batch_size);
  for (auto _ : state) {
    for (auto& p : blocks) p = r->allocate(block, alignof(std::max_align_t));
    benchmark::ClobberMemory();
    for (auto* p : blocks) r->deallocate(p, block, alignof(std::max_align_t));
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * batch_size));
}

// Keeps each run's CPU time per item so the ratios can be printed after the run (CPU
// time, not wall time: the reference machine is shared, and waiting for a core is not
// the resource's cost).
class ratio_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& run : runs) {
      if (run.run_type != Run::RT_Iteration || run.iterations == 0) continue;
      std::string name = run.run_name.function_name;
      if (run.threads > 1) name += "/threads:" + std::to_string(run.threads);
      const double ns = run.GetAdjustedCPUTime() / (name.find("batch") == 0 ? batch_size : 1);
      // The fastest repetition: the one least disturbed by other work on the machine.
      auto [it, fresh] = ns_per_item_.emplace(name, ns);
      if (!fresh) it->second = std::min(it->second, ns);
    }
    ConsoleReporter::ReportRuns(runs);
  }

  void print_ratios(const std::vector<std::pair<std::string, std::string>>& pairs) const {
    std::printf("\n%-38s %-24s %9s %9s %7s\n", "tracked", "baseline (same run)", "cpu ns/op",
                "base", "ratio");
    for (const auto& [tracked, base] : pairs) {
      auto t = ns_per_item_.find(tracked), b = ns_per_item_.find(base);
      if (t == ns_per_item_.end() || b == ns_per_item_.end()) continue;
      std::printf("%-38s %-24s %9.2f %9.2f %6.2fx\n", tracked.c_str(), base.c_str(), t->second,
                  b->second, t->second / b->second);
    }
  }

 private:
  std::map<std::string, double> ns_per_item_;
};

struct subject {
  std::string name;
  std::pmr::memory_resource* resource;
  std::string baseline;  // empty: it is a baseline
  bool thread_safe;
};

}  // namespace

// With --with_threads, the thread-safe subjects run on two threads at once. A separate
// run: the resource's lock skips atomics only while the process has one thread, and
// once a thread has started that is over for the rest of the process.
int main(int argc, char** argv) {
  std::vector<char*> args(argv, argv + argc);
  const auto flag = std::find_if(args.begin(), args.end(), [](const char* a) { return std::string(a) == "--with_threads"; });
  const int threads = flag != args.end() ? 2 : 1;
  if (flag != args.end()) args.erase(flag);

  std::pmr::memory_resource* new_delete = std::pmr::new_delete_resource();
  std::pmr::unsynchronized_pool_resource pool(new_delete);
  std::pmr::synchronized_pool_resource sync_pool(new_delete);
  memshuffle::tracking_resource tracked_new_delete(new_delete);
  memshuffle::tracking_resource tracked_new_delete_unsync({.thread_safe = false}, new_delete);
  memshuffle::tracking_resource tracked_pool(&pool);
  memshuffle::tracking_resource tracked_pool_unsync({.thread_safe = false}, &pool);
  memshuffle::tracking_resource tracked_sync_pool(&sync_pool);
  memshuffle::tracking_resource tracked_stacks({.capture_stacks = true}, new_delete);
  const std::vector<subject> subjects = {
      {"new_delete", new_delete, "", true},
      {"tracking(new_delete)", &tracked_new_delete, "new_delete", true},
      {"tracking_unsync(new_delete)", &tracked_new_delete_unsync, "new_delete", false},
      {"std_pool", &pool, "", false},
      {"tracking(std_pool)", &tracked_pool, "std_pool", false},  // safe, but over an unsafe pool
      {"tracking_unsync(std_pool)", &tracked_pool_unsync, "std_pool", false},
      {"std_sync_pool", &sync_pool, "", true},
      {"tracking(std_sync_pool)", &tracked_sync_pool, "std_sync_pool", true},
      // The cost of a stack walk per allocation (symbolized only for a report).
      {"tracking_stacks(new_delete)", &tracked_stacks, "new_delete", false},
  };
  const std::string suffix = threads > 1 ? "/threads:" + std::to_string(threads) : "";
  std::vector<std::pair<std::string, std::string>> ratios;
  for (const subject& x : subjects) {
    if (threads > 1 && !x.thread_safe) continue;
    using shape_fn = void (*)(benchmark::State&, std::pmr::memory_resource*);
    for (const auto& [shape, run] : {std::pair<const char*, shape_fn>{"pair64/", pairs}, {"batch64/", batch}}) {
      benchmark::RegisterBenchmark((shape + x.name).c_str(), run, x.resource)->Repetitions(5)->Threads(threads);
      if (!x.baseline.empty()) ratios.emplace_back(shape + x.name + suffix, shape + x.baseline + suffix);
    }
  }

  // Repetitions of all benchmarks interleaved, so a burst of load elsewhere hits the
  // tracked and the raw resource alike.
  std::string interleave = "--benchmark_enable_random_interleaving=true";
  args.insert(args.begin() + 1, interleave.data());
  int args_count = static_cast<int>(args.size());
  benchmark::Initialize(&args_count, args.data());
  ratio_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_ratios(ratios);
  benchmark::Shutdown();
}
