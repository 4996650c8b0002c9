// What encryption at rest costs, each figure beside the baseline it is judged against
// in the same run: raw Crypto++ (CTR and GCM, keyed once, on the same sizes) and
// libsodium's guarded memory, the usual way to keep a secret in memory. The goal table
// after the run holds the ratios.
#include "goal_report.hpp"

#include <memshuffle/shuffler.hpp>

#include <benchmark/benchmark.h>
#include <crypto++/aes.h>
#include <crypto++/gcm.h>
#include <crypto++/modes.h>
#include <sodium.h>
#include <sys/resource.h>

#include <array>
#include <cstddef>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace {

using memshuffle::cipher_kind;
using memshuffle::handle;
using memshuffle::shuffler;
using CryptoPP::byte;

const std::array<byte, 32> key{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                               17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};
constexpr std::size_t sizes[] = {32, 64, 4096};

// A rent and return: the entry is decrypted, touched, and encrypted again.
void rent_touch_return(shuffler& s, handle h) {
  auto lease = s.rent<std::byte>(h);
  lease.get()[0] ^= std::byte{1};
  benchmark::DoNotOptimize(lease.get());
}

// By default the plaintext is shown in a window of secret memory; in_place: the
// opt-in that decrypts in the arena instead.
void shuffler_rent_return(benchmark::State& state, cipher_kind kind, bool in_place = false) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  shuffler s({.cipher = kind, .plaintext_in_place = in_place});
  const handle h = s.alloc<std::byte>(bytes);
  rent_touch_return(s, h);   // written once, so renting decrypts from now on
  for (auto _ : state) rent_touch_return(s, h);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}

void BM_shuffler_ctr_rent_return(benchmark::State& state) {
  shuffler_rent_return(state, cipher_kind::aes_256_ctr);
}
void BM_shuffler_gcm_rent_return(benchmark::State& state) {
  shuffler_rent_return(state, cipher_kind::aes_256_gcm);
}
void BM_shuffler_none_rent_return(benchmark::State& state) {
  shuffler_rent_return(state, cipher_kind::none);
}
void BM_shuffler_ctr_rent_return_in_place(benchmark::State& state) {
  shuffler_rent_return(state, cipher_kind::aes_256_ctr, true);
}
void BM_shuffler_gcm_rent_return_in_place(benchmark::State& state) {
  shuffler_rent_return(state, cipher_kind::aes_256_gcm, true);
}

// Baseline: what a rent and return must do at least, two CTR passes (decrypt,
// encrypt) with a mode object keyed once and resynchronised per pass.
void BM_cryptopp_ctr_two_passes(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  std::vector<byte> data(bytes, 7);
  std::array<byte, 16> iv{};
  CryptoPP::CTR_Mode<CryptoPP::AES>::Encryption ctr;
  ctr.SetKeyWithIV(key.data(), key.size(), iv.data(), iv.size());
  for (auto _ : state) {
    ++iv[7];
    ctr.Resynchronize(iv.data(), static_cast<int>(iv.size()));
    ctr.ProcessData(data.data(), data.data(), bytes);
    data[0] ^= 1;
    ++iv[6];
    ctr.Resynchronize(iv.data(), static_cast<int>(iv.size()));
    ctr.ProcessData(data.data(), data.data(), bytes);
    benchmark::DoNotOptimize(data.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}

// Baseline for GCM: a verified decryption and an authenticated encryption, keyed once.
void BM_cryptopp_gcm_open_seal(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  std::vector<byte> data(bytes, 7);
  std::array<byte, 12> iv{};
  std::array<byte, 16> tag{};
  std::array<byte, 8> aad{};
  CryptoPP::GCM<CryptoPP::AES>::Encryption enc;
  CryptoPP::GCM<CryptoPP::AES>::Decryption dec;
  enc.SetKeyWithIV(key.data(), key.size(), iv.data(), iv.size());
  dec.SetKeyWithIV(key.data(), key.size(), iv.data(), iv.size());
  enc.EncryptAndAuthenticate(data.data(), tag.data(), tag.size(), iv.data(), iv.size(),
                             aad.data(), aad.size(), data.data(), bytes);
  for (auto _ : state) {
    if (!dec.DecryptAndVerify(data.data(), tag.data(), tag.size(), iv.data(), iv.size(),
                              aad.data(), aad.size(), data.data(), bytes))
      state.SkipWithError("tag mismatch");
    data[0] ^= 1;
    ++iv[0];
    enc.EncryptAndAuthenticate(data.data(), tag.data(), tag.size(), iv.data(), iv.size(),
                               aad.data(), aad.size(), data.data(), bytes);
    benchmark::DoNotOptimize(data.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}

// The seam alone: our cipher's two CTR passes, to split the shuffler's cost from the
// cipher's.
void BM_cipher_ctr_two_passes(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  std::vector<std::byte> data(bytes, std::byte{7});
  std::array<std::byte, 16> iv{};
  const memshuffle::cipher c(cipher_kind::aes_256_ctr, std::as_bytes(std::span(key)));
  for (auto _ : state) {
    iv[7] ^= std::byte{1};
    c.open(iv, {}, data, {});
    data[0] ^= std::byte{1};
    iv[6] = static_cast<std::byte>(static_cast<unsigned>(iv[6]) + 1);
    c.seal(iv, {}, data, {});
    benchmark::DoNotOptimize(data.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}

// libsodium's guarded memory: opened read-write around each access, no access between.
void BM_sodium_guarded_access(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  auto* p = static_cast<unsigned char*>(sodium_malloc(bytes));
  if (p == nullptr) {
    state.SkipWithError("sodium_malloc failed");
    return;
  }
  std::memset(p, 7, bytes);
  sodium_mprotect_noaccess(p);
  for (auto _ : state) {
    sodium_mprotect_readwrite(p);
    p[0] ^= 1;
    benchmark::DoNotOptimize(p);
    sodium_mprotect_noaccess(p);
  }
  sodium_mprotect_readwrite(p);
  sodium_free(p);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}

// Threads renting distinct 4 KiB entries of one shuffler.
constexpr std::size_t thread_entry = 4096;
struct shared_heap {
  shuffler s{{.cipher = cipher_kind::aes_256_ctr}};
  std::vector<handle> entries;
  shared_heap() {
    for (int i = 0; i < 8; ++i) {
      entries.push_back(s.alloc<std::byte>(thread_entry));
      rent_touch_return(s, entries.back());
    }
  }
};
// Voluntary context switches of the calling thread: a thread that waits for a lock
// held by another sleeps, so serialisation shows here even when the machine is too
// busy for wall-clock scaling to mean anything.
long voluntary_switches() {
  rusage u{};
  getrusage(RUSAGE_THREAD, &u);
  return u.ru_nvcsw;
}
void threads_rent_return(benchmark::State& state) {
  static shared_heap heap;
  const handle h = heap.entries[static_cast<std::size_t>(state.thread_index())];
  const long switches = voluntary_switches();
  for (auto _ : state) rent_touch_return(heap.s, h);
  state.SetItemsProcessed(state.iterations());
  state.counters["waits_per_kop"] = benchmark::Counter(
      1000.0 * static_cast<double>(voluntary_switches() - switches) / static_cast<double>(state.iterations()),
      benchmark::Counter::kAvgThreads);
}

// The machine's own scaling: raw Crypto++, two CTR passes over 4 KiB, each thread with
// its own mode object and buffer (nothing shared at all).
void cryptopp_threads(benchmark::State& state) {
  std::vector<byte> data(thread_entry, 7);
  std::array<byte, 16> iv{};
  CryptoPP::CTR_Mode<CryptoPP::AES>::Encryption ctr;
  ctr.SetKeyWithIV(key.data(), key.size(), iv.data(), iv.size());
  for (auto _ : state) {
    for (int pass = 0; pass < 2; ++pass) {
      ++iv[7];
      ctr.Resynchronize(iv.data(), static_cast<int>(iv.size()));
      ctr.ProcessData(data.data(), data.data(), data.size());
    }
    benchmark::DoNotOptimize(data.data());
  }
  state.SetItemsProcessed(state.iterations());
}

// Key rotation over 64 MiB of entries of one size, against the same rotation without
// custody: raw Crypto++ CTR objects keyed once, each entry decrypted under the old key
// and encrypted under the new one in place, in the ordinary heap (plaintext there for a
// moment, no scratch of secret memory, no batches, no register clearing).
constexpr std::size_t rotated_bytes = std::size_t{64} << 20;

void BM_shuffler_rotate_key_64MiB(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  shuffler s({.cipher = cipher_kind::aes_256_ctr});
  const std::vector<std::byte> value(bytes, std::byte{7});
  for (std::size_t i = 0; i < rotated_bytes / bytes; ++i) s.write(s.alloc<std::byte>(bytes), value);
  for (auto _ : state) s.rotate_key();
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * rotated_bytes));
}

void BM_cryptopp_rotate_64MiB(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  std::vector<byte> heap(rotated_bytes, 7);
  std::array<byte, 32> next_key = key;
  next_key[0] ^= 1;
  std::array<byte, 16> iv{};
  CryptoPP::CTR_Mode<CryptoPP::AES>::Encryption from, to;
  from.SetKeyWithIV(key.data(), key.size(), iv.data(), iv.size());
  to.SetKeyWithIV(next_key.data(), next_key.size(), iv.data(), iv.size());
  auto* old_key = &from;
  auto* new_key = &to;
  std::uint64_t seq = 0;
  for (auto _ : state) {
    for (std::size_t at = 0; at < rotated_bytes; at += bytes) {
      std::memcpy(iv.data(), &seq, sizeof seq);  // the entry's old counter
      old_key->Resynchronize(iv.data(), static_cast<int>(iv.size()));
      old_key->ProcessData(heap.data() + at, heap.data() + at, bytes);
      ++seq;                                      // and a fresh one
      std::memcpy(iv.data(), &seq, sizeof seq);
      new_key->Resynchronize(iv.data(), static_cast<int>(iv.size()));
      new_key->ProcessData(heap.data() + at, heap.data() + at, bytes);
    }
    std::swap(old_key, new_key);
    benchmark::DoNotOptimize(heap.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * rotated_bytes));
}

void register_all() {
  for (std::size_t n : sizes) {
    const auto arg = static_cast<std::int64_t>(n);
    benchmark::RegisterBenchmark("BM_shuffler_ctr_rent_return", BM_shuffler_ctr_rent_return)->Arg(arg);
    benchmark::RegisterBenchmark("BM_cryptopp_ctr_two_passes", BM_cryptopp_ctr_two_passes)->Arg(arg);
    benchmark::RegisterBenchmark("BM_cipher_ctr_two_passes", BM_cipher_ctr_two_passes)->Arg(arg);
    benchmark::RegisterBenchmark("BM_shuffler_gcm_rent_return", BM_shuffler_gcm_rent_return)->Arg(arg);
    benchmark::RegisterBenchmark("BM_cryptopp_gcm_open_seal", BM_cryptopp_gcm_open_seal)->Arg(arg);
    benchmark::RegisterBenchmark("BM_shuffler_none_rent_return", BM_shuffler_none_rent_return)->Arg(arg);
    benchmark::RegisterBenchmark("BM_shuffler_ctr_rent_return_in_place", BM_shuffler_ctr_rent_return_in_place)
        ->Arg(arg);
    benchmark::RegisterBenchmark("BM_shuffler_gcm_rent_return_in_place", BM_shuffler_gcm_rent_return_in_place)
        ->Arg(arg);
    benchmark::RegisterBenchmark("BM_sodium_guarded_access", BM_sodium_guarded_access)->Arg(arg);
  }
  for (std::int64_t n : {64, 4096}) {
    benchmark::RegisterBenchmark("BM_shuffler_rotate_key_64MiB", BM_shuffler_rotate_key_64MiB)
        ->Arg(n)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("BM_cryptopp_rotate_64MiB", BM_cryptopp_rotate_64MiB)
        ->Arg(n)->Unit(benchmark::kMillisecond);
  }
  // Separate names, so the goal table can tell the two runs apart.
  benchmark::RegisterBenchmark("BM_ctr_rent_return_4KiB_1_thread", threads_rent_return)
      ->Threads(1)->UseRealTime();
  benchmark::RegisterBenchmark("BM_ctr_rent_return_4KiB_2_threads", threads_rent_return)
      ->Threads(2)->UseRealTime();
  benchmark::RegisterBenchmark("BM_cryptopp_ctr_4KiB_1_thread", cryptopp_threads)->Threads(1)->UseRealTime();
  benchmark::RegisterBenchmark("BM_cryptopp_ctr_4KiB_2_threads", cryptopp_threads)->Threads(2)->UseRealTime();
}

void print_goals(const memshuffle::bench::goal_reporter& r) {
  using memshuffle::bench::goal;
  using memshuffle::bench::print_goal;
  using memshuffle::bench::ratio;
  std::printf("\nEncryption goals (ratios of this run):\n");
  print_goal("CTR rent+return 4 KiB / Crypto++ CTR x2", ratio(r.ns("BM_shuffler_ctr_rent_return/4096"),
             r.ns("BM_cryptopp_ctr_two_passes/4096")), "x", goal{1.25, true});
  print_goal("CTR rent+return 64 B", r.ns("BM_shuffler_ctr_rent_return/64"), "ns", goal{150, true});
  // Key custody (secret memory, register clearing) must cost little on small entries.
  print_goal("CTR rent+return 64 B / Crypto++ CTR x2", ratio(r.ns("BM_shuffler_ctr_rent_return/64"),
             r.ns("BM_cryptopp_ctr_two_passes/64")), "x", goal{1.8, true});
  print_goal("cipher CTR x2 64 B / Crypto++ CTR x2", ratio(r.ns("BM_cipher_ctr_two_passes/64"),
             r.ns("BM_cryptopp_ctr_two_passes/64")), "x");
  print_goal("GCM rent+return 4 KiB / Crypto++ GCM", ratio(r.ns("BM_shuffler_gcm_rent_return/4096"),
             r.ns("BM_cryptopp_gcm_open_seal/4096")), "x", goal{1.25, true});
  print_goal("GCM rent+return 64 B / Crypto++ GCM", ratio(r.ns("BM_shuffler_gcm_rent_return/64"),
             r.ns("BM_cryptopp_gcm_open_seal/64")), "x", goal{1.8, true});
  print_goal("GCM rent+return 64 B", r.ns("BM_shuffler_gcm_rent_return/64"), "ns");
  // Custody (secret scratch, batches, register clearing) must cost little on rotation too.
  print_goal("rotate_key 64 MiB of 4 KiB / Crypto++ in place", ratio(r.ns("BM_shuffler_rotate_key_64MiB/4096"),
             r.ns("BM_cryptopp_rotate_64MiB/4096")), "x", goal{1.25, true});
  print_goal("rotate_key 64 MiB of 64 B / Crypto++ in place", ratio(r.ns("BM_shuffler_rotate_key_64MiB/64"),
             r.ns("BM_cryptopp_rotate_64MiB/64")), "x", goal{1.25, true});
  print_goal("CTR rent+return 32 B / sodium guarded 32 B", ratio(r.ns("BM_shuffler_ctr_rent_return/32"),
             r.ns("BM_sodium_guarded_access/32")), "x");
  print_goal("CTR rent+return 4 KiB / sodium guarded 4 KiB", ratio(r.ns("BM_shuffler_ctr_rent_return/4096"),
             r.ns("BM_sodium_guarded_access/4096")), "x");
  print_goal("2 threads / 1 thread, 4 KiB CTR rent+return",
             ratio(r.counter("BM_ctr_rent_return_4KiB_2_threads", "items_per_second"),
                   r.counter("BM_ctr_rent_return_4KiB_1_thread", "items_per_second")),
             "x", goal{1.6, false});
  print_goal("raw Crypto++ CTR 2 threads / 1 thread (machine)",
             ratio(r.counter("BM_cryptopp_ctr_4KiB_2_threads", "items_per_second"),
                   r.counter("BM_cryptopp_ctr_4KiB_1_thread", "items_per_second")),
             "x");
  // Waiting for a lock costs no CPU, so a busy machine hides serialisation from the
  // times; the threads' voluntary context switches show it.
  print_goal("2 threads, lock waits per 1000 rent+return",
             r.counter("BM_ctr_rent_return_4KiB_2_threads", "waits_per_kop"), "");
}

}  // namespace

int main(int argc, char** argv) {
  if (sodium_init() < 0) return 1;
  memshuffle::bench::goal_reporter reporter(memshuffle::bench::goal_reporter::options_from(argc, argv));
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  print_goals(reporter);
  benchmark::Shutdown();
}
