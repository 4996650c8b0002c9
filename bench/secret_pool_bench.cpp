// Secret memory for small secrets: allocate+free of 64 bytes from the packed pool
// against a page of its own (secure_page_resource), libsodium's sodium_malloc and
// new/delete; and rent+return of a 64-byte CTR entry decrypted into a window from the
// pool against decryption in place.
#include <memshuffle/secret_pool_resource.hpp>
#include <memshuffle/secure_page_resource.hpp>
#include <memshuffle/shuffler.hpp>

#include <benchmark/benchmark.h>
#include <sodium.h>

#include <memory_resource>
#include <vector>

#include "goal_report.hpp"

namespace {

constexpr std::size_t secret_bytes = 64;

void alloc_free(benchmark::State& state, std::pmr::memory_resource& r) {
  for (auto _ : state) {
    void* p = r.allocate(secret_bytes, 8);
    benchmark::DoNotOptimize(p);
    r.deallocate(p, secret_bytes, 8);
  }
}

void alloc_free_pool(benchmark::State& state) {
  memshuffle::secret_pool_resource pool;
  alloc_free(state, pool);
  state.SetLabel(memshuffle::to_string(pool.report().backend));
}

void alloc_free_secure_page(benchmark::State& state) {
  memshuffle::secure_page_resource pages;
  alloc_free(state, pages);
}

void alloc_free_new_delete(benchmark::State& state) { alloc_free(state, *std::pmr::new_delete_resource()); }

void alloc_free_sodium(benchmark::State& state) {
  for (auto _ : state) {
    void* p = sodium_malloc(secret_bytes);
    benchmark::DoNotOptimize(p);
    sodium_free(p);
  }
}

// Rent and return entries of 64 bytes in turn, from a shuffler of 1024 of them.
void rent_return(benchmark::State& state, std::pmr::memory_resource* plaintext) {
  memshuffle::shuffler s(memshuffle::shuffler_options{.plaintext_resource = plaintext});
  std::vector<memshuffle::handle> handles;
  for (int i = 0; i < 1024; ++i) handles.push_back(s.alloc<std::byte>(secret_bytes));
  std::size_t i = 0;
  for (auto _ : state) {
    auto lease = s.rent<std::byte>(handles[i++ % handles.size()]);
    benchmark::DoNotOptimize(lease.get());
  }
}

void rent_return_pool_window(benchmark::State& state) {
  rent_return(state, &memshuffle::default_secret_pool());
}

void rent_return_in_place(benchmark::State& state) { rent_return(state, nullptr); }

}  // namespace

BENCHMARK(alloc_free_pool);
BENCHMARK(alloc_free_secure_page);
BENCHMARK(alloc_free_sodium);
BENCHMARK(alloc_free_new_delete);
BENCHMARK(rent_return_pool_window);
BENCHMARK(rent_return_in_place);

int main(int argc, char** argv) {
  using memshuffle::bench::goal;
  using memshuffle::bench::print_goal;
  using memshuffle::bench::ratio;
  if (sodium_init() < 0) return 1;
  memshuffle::bench::goal_reporter r(memshuffle::bench::goal_reporter::options_from(argc, argv));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks(&r);
  std::printf("\ngoals (cpu time ratios)\n");
  print_goal("pool / new_delete, alloc+free 64 B", ratio(r.ns("alloc_free_pool"), r.ns("alloc_free_new_delete")), "x",
             goal{3.0, true});
  print_goal("sodium_malloc / pool, alloc+free 64 B", ratio(r.ns("alloc_free_sodium"), r.ns("alloc_free_pool")), "x",
             goal{100.0, false});
  print_goal("secure_page / pool, alloc+free 64 B", ratio(r.ns("alloc_free_secure_page"), r.ns("alloc_free_pool")),
             "x");
  print_goal("pool window / in place, rent+return 64 B CTR",
             ratio(r.ns("rent_return_pool_window"), r.ns("rent_return_in_place")), "x", goal{1.25, true});
  benchmark::Shutdown();
  return 0;
}
