// The shuffler at scale (issue 14): on a 1 GiB heap, the rent+return latency one thread
// sees while another runs a full shuffle() and a rotate_key(), and the times of
// shuffle(budget) steps; the per-entry cost of alloc, shuffle and rotate_key at 10,000
// and at 10 million entries; rent+return throughput against the thread count.
// Cipher AES-256-CTR (the default) throughout. --csv_dir=DIR also writes the latency
// distributions and the thread sweep as CSV files there (scripts/plots draws them).
#include "goal_report.hpp"

#include <memshuffle/shuffler.hpp>
#include <memshuffle/tracking_resource.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using memshuffle::handle;
using memshuffle::shuffler;
using clock_type = std::chrono::steady_clock;

constexpr std::size_t gib = std::size_t{1} << 30;
std::string csv_dir;  // empty: no CSV files

// A shuffler holding count entries of bytes each, every one written once.
std::vector<handle> fill(shuffler& s, std::size_t count, std::size_t bytes) {
  std::vector<handle> hs;
  hs.reserve(count);
  std::vector<std::byte> data(bytes);
  for (std::size_t i = 0; i < count; ++i) {
    std::memset(data.data(), static_cast<int>(i), bytes);
    hs.push_back(s.alloc<std::byte>(bytes));
    s.write(hs.back(), data);
  }
  return hs;
}

double thread_cpu_us() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) / 1e3;
}

double percentile(std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const auto i = static_cast<std::size_t>(p / 100 * static_cast<double>(sorted.size() - 1));
  return sorted[i];
}

// The distribution as counters (microseconds), and, with --csv_dir, as rows of
// latency.csv: case, percentile, microseconds.
void report_latencies(benchmark::State& state, std::vector<double> us, const std::string& name) {
  std::sort(us.begin(), us.end());
  state.counters["samples"] = static_cast<double>(us.size());
  state.counters["p50_us"] = percentile(us, 50);
  state.counters["p99_us"] = percentile(us, 99);
  state.counters["p99.9_us"] = percentile(us, 99.9);
  state.counters["max_us"] = us.empty() ? 0 : us.back();
  if (csv_dir.empty()) return;
  static std::map<std::string, bool> started;
  const std::string path = csv_dir + "/latency.csv";
  std::ofstream out(path, started.empty() ? std::ios::trunc : std::ios::app);
  if (started.empty()) out << "case,percentile,microseconds\n";
  started[name] = true;
  for (double p = 0; p < 99; p += 1) out << name << ',' << p << ',' << percentile(us, p) << '\n';
  for (double p = 99; p < 100; p += 0.01) out << name << ',' << p << ',' << percentile(us, p) << '\n';
  out << name << ",100," << us.back() << '\n';
}

// One rent+return: when it started and how long it took (microseconds).
struct timed_op {
  double start_us, us;
};

// rent+return of random entries, timed one by one, until stop (or count operations).
std::vector<timed_op> rent_return_loop(shuffler& s, const std::vector<handle>& hs, const std::atomic<bool>& stop,
                                       std::size_t count, clock_type::time_point begin) {
  std::vector<timed_op> ops;
  ops.reserve(1 << 20);
  std::mt19937_64 rng(20261202);
  while (!stop.load(std::memory_order_relaxed) && ops.size() < count) {
    const handle h = hs[rng() % hs.size()];
    const auto t0 = clock_type::now();
    {
      auto lease = s.rent<std::byte>(h);
      benchmark::DoNotOptimize(lease.get()[0]);
    }
    const auto t1 = clock_type::now();
    ops.push_back({std::chrono::duration<double, std::micro>(t0 - begin).count(),
                   std::chrono::duration<double, std::micro>(t1 - t0).count()});
  }
  return ops;
}

// Counted by time, so that a long wait cannot hide among many fast operations: the
// run cut into slices of 1 ms, each slice's figure the longest operation under way
// in it (a wait of 50 ms fills 50 slices).
std::vector<double> worst_per_slice(const std::vector<timed_op>& ops, double from_us, double to_us) {
  constexpr double slice_us = 1000;
  std::vector<double> worst;
  for (const timed_op& op : ops) {
    if (op.start_us < from_us || op.start_us >= to_us) continue;
    const auto first = static_cast<std::size_t>(op.start_us / slice_us);
    const auto last = static_cast<std::size_t>((op.start_us + op.us) / slice_us);
    if (worst.size() <= last) worst.resize(last + 1, 0);
    for (std::size_t k = first; k <= last; ++k) worst[k] = std::max(worst[k], op.us);
  }
  worst.erase(worst.begin(), worst.begin() + static_cast<std::ptrdiff_t>(std::min<double>(
                                                  static_cast<double>(worst.size()), from_us / slice_us)));
  std::sort(worst.begin(), worst.end());
  return worst;
}

// The slices' figures as counters named prefix_p99_us, prefix_p99.9_us, prefix_max_us.
void report_slices(benchmark::State& state, const std::string& prefix, std::vector<double> slices) {
  state.counters[prefix + "_slices"] = static_cast<double>(slices.size());
  state.counters[prefix + "_p99_us"] = percentile(slices, 99);
  state.counters[prefix + "_p99.9_us"] = percentile(slices, 99.9);
  state.counters[prefix + "_max_us"] = slices.empty() ? 0 : slices.back();
}

std::vector<double> latencies(const std::vector<timed_op>& ops) {
  std::vector<double> us;
  us.reserve(ops.size());
  for (const timed_op& op : ops) us.push_back(op.us);
  return us;
}

// Argument 0: the entry size (4096: 262,144 entries; 64: 16 million entries); argument
// 1: whether another thread runs a full shuffle() and then a rotate_key() meanwhile.
void BM_rent_return_latency_1GiB(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  const bool concurrent = state.range(1) != 0;
  for (auto _ : state) {
    state.PauseTiming();
    memshuffle::tracking_resource upstream;  // its peak: the most the shuffle held at once
    shuffler s({}, &upstream);
    const std::vector<handle> hs = fill(s, gib / bytes, bytes);
    const std::size_t heap_bytes = upstream.stats().current_bytes;
    state.ResumeTiming();
    std::atomic<bool> stop{false};
    double shuffle_ms = 0, rotate_ms = 0;
    std::thread mover;
    const auto begin = clock_type::now();
    if (concurrent) {
      mover = std::thread([&] {
        auto t0 = clock_type::now();
        s.shuffle();
        auto t1 = clock_type::now();
        s.rotate_key();
        auto t2 = clock_type::now();
        shuffle_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
        rotate_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
        stop = true;
      });
    }
    const std::vector<timed_op> ops = rent_return_loop(s, hs, stop, concurrent ? SIZE_MAX : 200'000, begin);
    if (concurrent) mover.join();
    state.counters["shuffle_ms"] = shuffle_ms;
    state.counters["rotate_ms"] = rotate_ms;
    // The upstream's peak beyond the heap as filled, in arenas (of the default size).
    state.counters["peak_extra_arenas"] =
        static_cast<double>(upstream.stats().peak_bytes - heap_bytes) / static_cast<double>(s.stats().reserved_bytes) *
        static_cast<double>(s.stats().arenas);
    // The run, and in it the shuffle and the key rotation apart (the mover starts
    // about when the loop does).
    const double end_us = 1e300, shuffled_us = shuffle_ms * 1e3;
    report_slices(state, "slice", worst_per_slice(ops, 0, end_us));
    if (concurrent) {
      report_slices(state, "shuffle_slice", worst_per_slice(ops, 0, shuffled_us));
      report_slices(state, "rotate_slice", worst_per_slice(ops, shuffled_us, end_us));
    }
    report_latencies(state, latencies(ops),
                     std::to_string(bytes) + (concurrent ? " B during shuffle+rotate_key" : " B alone"));
  }
}
BENCHMARK(BM_rent_return_latency_1GiB)
    ->ArgNames({"bytes", "concurrent"})
    ->Args({4096, 0})
    ->Args({4096, 1})
    ->Args({64, 0})
    ->Args({64, 1})
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// shuffle(budget) of 256 KiB, step after step until the pass ends, each step timed.
// Pass 1 is the first pass after the heap was filled: its new arenas are memory the
// upstream hands out for the first time, and each page's first touch is a page fault
// (costly in a virtual machine). Pass 2 runs after an untimed pass, on memory the
// first one gave back: what the steps cost once a process has run a pass.
void BM_shuffle_steps_256KiB_1GiB(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  const auto pass = state.range(1);
  for (auto _ : state) {
    state.PauseTiming();
    shuffler s;
    const std::vector<handle> hs = fill(s, gib / bytes, bytes);
    for (auto untimed = pass - 1; untimed > 0; --untimed)
      for (const std::uint64_t before = s.stats().shuffles; s.stats().shuffles == before;) s.shuffle(256 * 1024);
    const std::size_t heap = s.stats().reserved_bytes;
    std::size_t peak = heap;
    state.ResumeTiming();
    std::vector<double> us, cpu_us;
    const std::uint64_t before = s.stats().shuffles;
    while (s.stats().shuffles == before) {
      const double c0 = thread_cpu_us();
      const auto t0 = clock_type::now();
      s.shuffle(256 * 1024);
      us.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
      cpu_us.push_back(thread_cpu_us() - c0);
      peak = std::max(peak, s.stats().reserved_bytes);
    }
    state.counters["steps"] = static_cast<double>(us.size());
    // An arena goes back when its last entry has moved; visited at random, most arenas
    // empty near the pass's end, so the heap holds nearly twice its bytes meanwhile.
    state.counters["peak_over_heap"] = static_cast<double>(peak) / static_cast<double>(heap);
    // The thread's CPU time per step: what the step costs, without the waits for a core
    // on a loaded machine.
    std::sort(cpu_us.begin(), cpu_us.end());
    state.counters["cpu_p50_us"] = percentile(cpu_us, 50);
    state.counters["cpu_p99.9_us"] = percentile(cpu_us, 99.9);
    state.counters["cpu_max_us"] = cpu_us.back();
    report_latencies(state, std::move(us),
                     std::to_string(bytes) + " B shuffle(256 KiB) steps, pass " + std::to_string(pass));
  }
}
BENCHMARK(BM_shuffle_steps_256KiB_1GiB)->ArgNames({"bytes", "pass"})->ArgsProduct({{4096, 64}, {1, 2}})
    ->Iterations(1)->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// Per entry (CPU time of this thread): alloc+write, a full shuffle, a rotate_key. A small
// heap is measured over several shufflers, each phase's median kept: one run of 10,000
// entries lasts about a millisecond, and the first one in a process pays for cold caches
// and fresh pages as much as for its work.
void BM_growth_64B(benchmark::State& state) {
  const auto count = static_cast<std::size_t>(state.range(0));
  const auto cpu = [] { return thread_cpu_us() * 1e3; };  // ns
  const std::size_t rounds = std::clamp<std::size_t>(1'000'000 / count, 1, 21);
  for (auto _ : state) {
    std::array<std::vector<double>, 3> per_entry;  // alloc, shuffle, rotate_key
    for (std::size_t r = 0; r < rounds; ++r) {
      shuffler s;
      const double t0 = cpu();
      const std::vector<handle> hs = fill(s, count, 64);
      const double t1 = cpu();
      s.shuffle();
      const double t2 = cpu();
      s.rotate_key();
      const double t3 = cpu();
      const double n = static_cast<double>(count);
      per_entry[0].push_back((t1 - t0) / n);
      per_entry[1].push_back((t2 - t1) / n);
      per_entry[2].push_back((t3 - t2) / n);
    }
    const auto median = [](std::vector<double>& v) {
      std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
      return v[v.size() / 2];
    };
    state.counters["alloc_ns"] = median(per_entry[0]);
    state.counters["shuffle_ns"] = median(per_entry[1]);
    state.counters["rotate_ns"] = median(per_entry[2]);
    state.counters["rounds"] = static_cast<double>(rounds);
  }
}
BENCHMARK(BM_growth_64B)->ArgName("entries")->Arg(10'000)->Arg(10'000'000)->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// The thread sweeps: one shuffler per benchmark and shard count, kept for every thread
// count (made once, ended at exit). Argument: shards (1 is one lock for everything).
shuffler& sweep_shuffler(std::int64_t shards, bool churn) {
  // Churn: freed entries are dropped by the ratio policy's compaction as they pile up.
  static shuffler rent_one({.shards = 1}), rent_many;
  static shuffler churn_one({.shuffle_above_ratio = 2, .shards = 1}), churn_many({.shuffle_above_ratio = 2});
  if (churn) return shards == 1 ? churn_one : churn_many;
  return shards == 1 ? rent_one : rent_many;
}

// rent+return of 64-byte entries against the thread count, each thread renting 1024
// entries it allocated itself (with shards: in its own shard) before its timing began.
void BM_rent_return_threads_64B(benchmark::State& state) {
  shuffler& s = sweep_shuffler(state.range(0), false);
  const std::vector<handle> hs = fill(s, 1024, 64);
  std::size_t i = 0;
  for (auto _ : state) {
    auto lease = s.rent<std::byte>(hs[i++ % hs.size()]);
    benchmark::DoNotOptimize(lease.get()[0]);
  }
  state.SetItemsProcessed(state.iterations());
  for (const handle h : hs) s.free(h);
}

// alloc+free of 64-byte entries against the thread count.
void BM_alloc_free_threads_64B(benchmark::State& state) {
  shuffler& s = sweep_shuffler(state.range(0), true);
  for (auto _ : state) {
    const handle h = s.alloc<std::byte>(64);
    benchmark::DoNotOptimize(h);
    s.free(h);
  }
  state.SetItemsProcessed(state.iterations());
}

void thread_sweep(benchmark::internal::Benchmark* b) {
  b->ArgName("shards")->Arg(1)->Arg(8)->ThreadRange(1, 8)->UseRealTime()->Repetitions(5)->ReportAggregatesOnly(true);
}
BENCHMARK(BM_rent_return_threads_64B)->Apply(thread_sweep);
BENCHMARK(BM_alloc_free_threads_64B)->Apply(thread_sweep);

// The goal reporter, which also keeps the thread sweeps' medians (the goal reporter
// keys runs by name and arguments, which the thread counts share).
class sweep_reporter : public memshuffle::bench::goal_reporter {
 public:
  using goal_reporter::goal_reporter;
  // By "function/shards:N", then by thread count.
  std::map<std::string, std::map<int, double>> per_second;
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      const auto& n = r.run_name;
      if (r.aggregate_name == "median" && n.function_name.find("_threads_") != std::string::npos)
        per_second[n.function_name + "/" + n.args][static_cast<int>(r.threads)] =
            r.counters.at("items_per_second").value;
    }
    goal_reporter::ReportRuns(runs);
  }
  std::optional<double> at(const std::string& sweep, int threads) const {
    const auto s = per_second.find(sweep);
    if (s == per_second.end()) return std::nullopt;
    const auto t = s->second.find(threads);
    if (t == s->second.end()) return std::nullopt;
    return t->second;
  }
};

}  // namespace

int main(int argc, char** argv) {
  using namespace memshuffle::bench;
  csv_dir = take_flag(argc, argv, "csv_dir");
  sweep_reporter reporter(goal_reporter::options_from(argc, argv));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::fflush(stderr);

  std::printf("\ngoals (cipher AES-256-CTR; wall-clock latencies; same run):\n");
  for (const char* bytes : {"4096", "64"}) {
    const std::string during = std::string("BM_rent_return_latency_1GiB/bytes:") + bytes + "/concurrent:1";
    std::printf("  %s-byte entries, 1 GiB:\n", bytes);
    print_goal("  rent+return p99.9 during shuffle+rotate_key", reporter.counter(during, "p99.9_us"), "us",
               goal{500, true});
    print_goal("  rent+return max during shuffle+rotate_key", reporter.counter(during, "max_us"), "us");
    print_goal("  by 1 ms slices: p99.9 of each slice's longest", reporter.counter(during, "slice_p99.9_us"), "us",
               goal{500, true});
    print_goal("    while shuffle() runs", reporter.counter(during, "shuffle_slice_p99.9_us"), "us", goal{500, true});
    print_goal("    while rotate_key() runs", reporter.counter(during, "rotate_slice_p99.9_us"), "us", goal{500, true});
    print_goal("  alone, by 1 ms slices", reporter.counter(std::string("BM_rent_return_latency_1GiB/bytes:") + bytes +
                                                           "/concurrent:0", "slice_p99.9_us"), "us");
    print_goal("  upstream's peak beyond the heap during shuffle()", reporter.counter(during, "peak_extra_arenas"),
               "arenas", goal{2, true});
    for (const char* pass : {"1", "2"}) {
      const std::string steps = std::string("BM_shuffle_steps_256KiB_1GiB/bytes:") + bytes + "/pass:" + pass;
      std::printf("  shuffle(256 KiB) steps, pass %s:\n", pass);
      print_goal("    step p99.9", reporter.counter(steps, "p99.9_us"), "us", goal{500, true});
      print_goal("    step p99.9, thread CPU time", reporter.counter(steps, "cpu_p99.9_us"), "us");
      print_goal("    heap's peak during the pass / heap", reporter.counter(steps, "peak_over_heap"), "x");
    }
  }
  const std::string small = "BM_growth_64B/entries:10000", large = "BM_growth_64B/entries:10000000";
  for (const char* what : {"alloc_ns", "shuffle_ns", "rotate_ns"}) {
    const auto a = reporter.counter(small, what), b = reporter.counter(large, what);
    print_goal((std::string("growth 10M / 10k entries, ") + what).c_str(), ratio(b, a), "x", goal{1.5, true});
  }
  using memshuffle::bench::ratio;
  for (const char* shards : {"8", "1"}) {
    for (const char* op : {"rent_return", "alloc_free"}) {
      const std::string sweep = std::string("BM_") + op + "_threads_64B/shards:" + shards;
      const bool goals = std::string(shards) == "8";
      std::printf("  %s, 64 B, %s shard(s), throughput:\n", op, shards);
      const double need = std::string(op) == "rent_return" ? 1.7 : 1.5;
      print_goal("    2 threads / 1 thread", ratio(reporter.at(sweep, 2), reporter.at(sweep, 1)), "x",
                 goals ? std::optional<goal>(goal{need, false}) : std::nullopt);
      for (const int t : {4, 8})
        print_goal(("    " + std::to_string(t) + " threads / 2 threads").c_str(),
                   ratio(reporter.at(sweep, t), reporter.at(sweep, 2)), "x", goals ? std::optional<goal>(goal{0.9, false}) : std::nullopt);
    }
  }
  if (!csv_dir.empty()) {
    std::ofstream out(csv_dir + "/threads.csv");
    out << "threads,rent_return_8_shards,rent_return_1_shard,alloc_free_8_shards,alloc_free_1_shard\n";
    for (const int t : {1, 2, 4, 8})
    {
      out << t;
      for (const char* sweep : {"BM_rent_return_threads_64B/shards:8", "BM_rent_return_threads_64B/shards:1",
                                "BM_alloc_free_threads_64B/shards:8", "BM_alloc_free_threads_64B/shards:1"})
        out << ',' << reporter.at(sweep, t).value_or(0);
      out << '\n';
    }
  }
  benchmark::Shutdown();
}
