// The shuffler's costs (cipher none, so this is the allocator alone), each beside the
// baseline it is judged against in the same run: a std pool for alloc+free, memcpy
// for the bandwidth of a shuffle. The goal table after the run holds the ratios.
#include "goal_report.hpp"

#include <memshuffle/secure_wipe.hpp>
#include <memshuffle/shuffler.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstring>
#include <memory_resource>
#include <random>
#include <vector>

namespace {

using memshuffle::cipher_kind;
using memshuffle::handle;
using memshuffle::shuffler;

constexpr std::size_t frees_per_shuffle = 1024;
constexpr std::size_t big_heap = 64u << 20, big_entry = 4096;
constexpr std::size_t many_entries = 1'000'000, small_entry = 64;

using memshuffle::shuffler_options;

// No cipher and no window: what the handles, the heap and the lock cost alone.
shuffler_options plain() { return {.cipher = cipher_kind::none, .plaintext_in_place = true}; }

// The machine is shared: each benchmark runs 5 times and the median counts.
void repeated(benchmark::internal::Benchmark* b) { b->Repetitions(5)->ReportAggregatesOnly(true); }

void BM_rent_return_64B(benchmark::State& state) {
  shuffler s(plain());
  handle h = s.alloc<std::byte>(small_entry);
  for (auto _ : state) {
    auto lease = s.rent<std::byte>(h);
    benchmark::DoNotOptimize(lease.get());
  }
}
BENCHMARK(BM_rent_return_64B)->Apply(repeated);

// A freed entry is dropped at the next shuffle, so that shuffle is part of the price
// of free: one every frees_per_shuffle pairs, timed with them.
void BM_alloc_free_64B(benchmark::State& state) {
  shuffler s(plain());
  std::size_t n = 0;
  for (auto _ : state) {
    handle h = s.alloc<std::byte>(small_entry);
    benchmark::DoNotOptimize(h);
    s.free(h);
    if (++n % frees_per_shuffle == 0) s.shuffle();
  }
}
BENCHMARK(BM_alloc_free_64B)->Apply(repeated);

// Baseline: std's thread-safe pool (the shuffler is thread safe too).
void BM_std_sync_pool_alloc_free_64B(benchmark::State& state) {
  std::pmr::synchronized_pool_resource pool;
  for (auto _ : state) {
    void* p = pool.allocate(small_entry);
    benchmark::DoNotOptimize(p);
    pool.deallocate(p, small_entry);
  }
}
BENCHMARK(BM_std_sync_pool_alloc_free_64B)->Apply(repeated);

// Baselines for shuffle bandwidth: one memcpy of the whole heap into memory already
// touched, the best a move of every byte can do; and the same plus wiping what was
// left, the least a shuffle that wipes can do.
void memcpy_baseline(benchmark::State& state, bool wipe) {
  std::vector<std::byte> from(big_heap, std::byte{1}), to(big_heap, std::byte{2});
  for (auto _ : state) {
    std::memcpy(to.data(), from.data(), big_heap);
    if (wipe) memshuffle::secure_wipe(from.data(), big_heap);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * big_heap));
}
void BM_memcpy_64MiB(benchmark::State& state) { memcpy_baseline(state, false); }
void BM_memcpy_and_wipe_64MiB(benchmark::State& state) { memcpy_baseline(state, true); }
BENCHMARK(BM_memcpy_64MiB)->Apply(repeated)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_memcpy_and_wipe_64MiB)->Apply(repeated)->Unit(benchmark::kMillisecond);

// Fills a shuffler with count entries of bytes each, every one written once, and
// shuffles once untimed: the timed shuffles then see a steady heap, whose arenas
// reuse memory the upstream already had, as in a long-running program.
void fill(shuffler& s, std::size_t count, std::size_t bytes) {
  for (std::size_t i = 0; i < count; ++i) {
    auto lease = s.rent<std::byte>(s.alloc<std::byte>(bytes));
    std::memset(lease.get(), static_cast<int>(i), bytes);
  }
  s.shuffle();
}

// Argument: randomize_layout (1, the default, or 0: entries keep their order, which
// shows what the random order costs).
shuffler_options layout(const benchmark::State& state) {
  return {.cipher = cipher_kind::none, .randomize_layout = state.range(0) != 0};
}

void BM_shuffle_64MiB_in_4KiB(benchmark::State& state) {
  shuffler s(layout(state));
  fill(s, big_heap / big_entry, big_entry);
  for (auto _ : state) s.shuffle();
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * big_heap));
}
BENCHMARK(BM_shuffle_64MiB_in_4KiB)->Apply(repeated)->ArgName("random")->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond);

void BM_shuffle_1M_64B(benchmark::State& state) {
  shuffler s(layout(state));
  fill(s, many_entries, small_entry);
  for (auto _ : state) s.shuffle();
  state.counters["ns_per_entry"] = benchmark::Counter(
      double(many_entries), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_shuffle_1M_64B)->Apply(repeated)->ArgName("random")->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond);

// The same under churn: before each shuffle (untimed) 1% of the entries are freed and as
// many allocated, which reuse the freed slots but land in the arena being filled, far
// from their slot neighbours. Forty shuffles in a row show whether that adds up.
constexpr std::size_t churn_shuffles = 40;
void BM_shuffle_1M_64B_churn(benchmark::State& state) {
  shuffler s(plain());
  std::vector<handle> hs;
  for (std::size_t i = 0; i < many_entries; ++i) hs.push_back(s.alloc<std::byte>(small_entry));
  s.shuffle();
  std::mt19937_64 rng(20261122);
  for (auto _ : state) {
    state.PauseTiming();
    for (std::size_t k = 0; k < many_entries / 100; ++k) {
      handle& h = hs[rng() % hs.size()];
      s.free(h);
      h = s.alloc<std::byte>(small_entry);
    }
    state.ResumeTiming();
    s.shuffle();
  }
  state.counters["ns_per_entry"] = benchmark::Counter(
      double(many_entries), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_shuffle_1M_64B_churn)->Apply(repeated)->Iterations(churn_shuffles)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  using namespace memshuffle::bench;
  goal_reporter reporter(goal_reporter::options_from(argc, argv));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::fflush(stderr);

  auto bandwidth = [&](const char* name) { return reporter.counter(name, "bytes_per_second"); };
  auto per_entry = [&](const char* name) {
    auto t = reporter.ns(name);
    return t ? std::optional<double>(*t / double(many_entries)) : std::nullopt;
  };
  std::printf("\ngoals (cipher none; CPU time; same run):\n");
  print_goal("rent+return, 64 B entry", reporter.ns("BM_rent_return_64B"), "ns", goal{40, true});
  print_goal("alloc+free, 64 B entry", reporter.ns("BM_alloc_free_64B"), "ns", goal{60, true});
  print_goal("alloc+free / std synchronized_pool_resource",
             ratio(reporter.ns("BM_alloc_free_64B"), reporter.ns("BM_std_sync_pool_alloc_free_64B")), "x");
  print_goal("shuffle 64 MiB of 4 KiB / memcpy bandwidth",
             ratio(bandwidth("BM_shuffle_64MiB_in_4KiB/random:1"), bandwidth("BM_memcpy_64MiB")), "x",
             goal{0.5, false});
  print_goal("  same, entries kept in order",
             ratio(bandwidth("BM_shuffle_64MiB_in_4KiB/random:0"), bandwidth("BM_memcpy_64MiB")), "x");
  print_goal("  memcpy+wipe / memcpy (the floor with wiping)",
             ratio(bandwidth("BM_memcpy_and_wipe_64MiB"), bandwidth("BM_memcpy_64MiB")), "x");
  print_goal("shuffle of 1M 64 B entries, per entry", per_entry("BM_shuffle_1M_64B/random:1"), "ns",
             goal{30, true});
  print_goal("  same, entries kept in order", per_entry("BM_shuffle_1M_64B/random:0"), "ns");
  print_goal("  same, 1% churned before each of 40 shuffles", per_entry("BM_shuffle_1M_64B_churn"), "ns");
  benchmark::Shutdown();
}
