// Stress: 2 to 8 threads work on one shuffler for a bounded time - each on private
// entries (alloc, write, rent, read, free) and on entries shared by all (guarded by
// the test's own per-entry mutex, so "the last value written" is well defined, and
// also pinned without a look at their bytes by threads not holding that mutex) - while
// one more thread shuffles, steps incremental shuffles and rotates keys. At the end
// every value is what was last written, the stats agree, and nothing leaked.
// The thread sanitizer build runs this suite.
#include <doctest/doctest.h>

#include <memshuffle/shuffler.hpp>
#include <memshuffle/tracking_resource.hpp>
#include <test/support/seed.hpp>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace memshuffle;
using clock_type = std::chrono::steady_clock;

// Seconds each configuration runs; MEMSHUFFLE_STRESS_SECONDS overrides.
double stress_seconds() {
  const char* s = std::getenv("MEMSHUFFLE_STRESS_SECONDS");
  return s != nullptr ? std::atof(s) : 1.0;
}

// The first failure any thread saw, for the main thread to report.
class failures {
 public:
  void add(const std::string& what) {
    std::lock_guard lock(m_);
    if (count_++ == 0) first_ = what;
  }
  std::size_t count() const { std::lock_guard lock(m_); return count_; }
  std::string first() const { std::lock_guard lock(m_); return first_; }

 private:
  mutable std::mutex m_;
  std::size_t count_ = 0;
  std::string first_;
};

// A value nobody else writes: thread, counter and position in every byte group.
std::vector<std::byte> value_for(std::size_t bytes, std::uint64_t thread, std::uint64_t n) {
  std::vector<std::byte> v(bytes);
  for (std::size_t i = 0; i < bytes; ++i)
    v[i] = static_cast<std::byte>((thread * 131 + n * 17 + i * 7) & 0xFF);
  return v;
}

struct shared_entry {
  handle h;
  std::mutex m;  // the test's: held while reading or writing its bytes
  std::vector<std::byte> last;
};

struct config {
  int threads;
  cipher_kind cipher;
  bool on_return;
  std::size_t shards = shuffler_options{}.shards;
  bool upstream_thread_safe = true;  // false: the shards must serialize their calls
};

void run(const config& cfg, std::uint64_t seed) {
  // Not thread safe when asked: the thread sanitizer then sees any call the shards
  // make into it at once.
  tracking_resource upstream(tracking_options{.thread_safe = cfg.upstream_thread_safe});
  failures fails;
  std::size_t private_left = 0, private_bytes = 0;
  std::optional<shuffler> owner;
  owner.emplace(shuffler_options{.cipher = cfg.cipher, .shuffle_on_return = cfg.on_return,
                                 .arena_size = 4096, .shards = cfg.shards},
                &upstream);
  shuffler& s = *owner;
  std::vector<shared_entry> shared(8);
  for (std::size_t i = 0; i < shared.size(); ++i) {
    shared[i].h = s.alloc<std::uint64_t>(1 + i * 3);
    shared[i].last.assign(s.size_of(shared[i].h), std::byte{0});
  }

  std::atomic<bool> stop{false};
  const auto deadline = clock_type::now() + std::chrono::duration<double>(stress_seconds());
  std::vector<std::map<handle, std::vector<std::byte>>> owned(static_cast<std::size_t>(cfg.threads));

  auto worker = [&](std::size_t t) {
    std::mt19937_64 rng(seed + t);
    auto& mine = owned[t];
    std::uint64_t n = 0;
    auto pick_mine = [&] {
      auto it = mine.begin();
      std::advance(it, static_cast<long>(rng() % mine.size()));
      return it;
    };
    try {
      while (!stop.load(std::memory_order_relaxed)) {
        ++n;
        switch (rng() % 9) {
          case 0: case 1: {  // a private entry
            if (mine.size() >= 32) break;
            const handle h = s.alloc<std::uint32_t>(1 + rng() % 64);
            auto v = value_for(s.size_of(h), t, n);
            s.write(h, v);
            mine[h] = std::move(v);
            break;
          }
          case 2: {  // rewrite a private entry through a lease
            if (mine.empty()) break;
            auto it = pick_mine();
            auto l = s.rent<std::byte>(it->first);
            if (std::memcmp(l.get(), it->second.data(), it->second.size()) != 0)
              fails.add("a private entry changed under its lease's owner");
            it->second = value_for(it->second.size(), t, n);
            std::memcpy(l.get(), it->second.data(), it->second.size());
            break;
          }
          case 3: {  // read a private entry
            if (mine.empty()) break;
            auto it = pick_mine();
            std::vector<std::byte> out(it->second.size());
            s.read(it->first, out);
            if (out != it->second) fails.add("a private entry read back wrong");
            break;
          }
          case 4: {  // free a private entry: invalid at once
            if (mine.empty()) break;
            auto it = pick_mine();
            s.free(it->first);
            if (s.valid(it->first)) fails.add("a freed handle is still valid");
            mine.erase(it);
            break;
          }
          case 5: case 6: {  // write a shared entry, and check the last value first
            auto& e = shared[rng() % shared.size()];
            std::lock_guard lock(e.m);
            auto* p = s.rent_pointer<std::byte*>(e.h);
            if (std::memcmp(p, e.last.data(), e.last.size()) != 0)
              fails.add("a shared entry lost its last written value");
            e.last = value_for(e.last.size(), t, n);
            std::memcpy(p, e.last.data(), e.last.size());
            s.return_pointer(e.h);
            break;
          }
          case 7: {  // pin a shared entry without touching its bytes: it must stay put
            auto& e = shared[rng() % shared.size()];
            auto l = s.rent<std::byte>(e.h);
            const void* where = l.get();
            std::this_thread::yield();
            auto again = s.rent<std::byte>(e.h);
            if (again.get() != where) fails.add("a pinned entry moved");
            break;
          }
          default: {  // misuse is refused: a return without a rent
            if (mine.empty()) break;
            try {
              s.return_pointer(pick_mine()->first);
              fails.add("a return without a rent was accepted");
            } catch (const lease_error&) {
            }
          }
        }
      }
    } catch (const std::exception& e) {
      fails.add(std::string("thread threw: ") + e.what());
    }
  };

  auto keeper = [&] {
    std::mt19937_64 rng(seed ^ 0x5eed);
    try {
      while (!stop.load(std::memory_order_relaxed)) {
        switch (rng() % 5) {
          case 0: s.shuffle(); break;
          case 1: case 2: s.shuffle(1 + rng() % 2048); break;
          case 3: s.rotate_key(); break;
          default: {
            key_type key{};
            salt_type salt{};
            key[rng() % key.size()] = std::byte{static_cast<unsigned char>(rng())};
            salt[0] = std::byte{static_cast<unsigned char>(rng())};
            s.rotate_key(key, salt);
          }
        }
        const auto st = s.stats();
        if (st.live_entries < shared.size()) fails.add("live_entries fell below the shared entries");
        std::this_thread::yield();
      }
    } catch (const std::exception& e) {
      fails.add(std::string("keeper threw: ") + e.what());
    }
  };

  std::vector<std::thread> pool;
  for (int t = 0; t < cfg.threads; ++t) pool.emplace_back(worker, static_cast<std::size_t>(t));
  pool.emplace_back(keeper);
  std::this_thread::sleep_until(deadline);
  stop = true;
  for (auto& th : pool) th.join();

  CHECK_MESSAGE(fails.count() == 0, fails.first());

  // Every value is what its last writer wrote; the stats agree with the model.
  std::size_t bytes = 0, entries = shared.size();
  for (auto& e : shared) {
    std::vector<std::byte> out(e.last.size());
    s.read(e.h, out);
    CHECK(out == e.last);
    bytes += e.last.size();
  }
  for (auto& mine : owned)
    for (auto& [h, v] : mine) {
      std::vector<std::byte> out(v.size());
      s.read(h, out);
      CHECK(out == v);
      bytes += v.size();
      ++entries;
      ++private_left;
      private_bytes += v.size();
    }
  const auto st = s.stats();
  CHECK(st.live_entries == entries);
  CHECK(st.live_bytes == bytes);
  CHECK(st.pinned_entries == 0);
  CHECK(st.reserved_bytes == upstream.stats().current_bytes);
  s.shuffle();
  CHECK(s.stats().pending_free_entries == 0);
  owner.reset();  // wipes and gives everything back
  CHECK_FALSE(upstream.has_leaks());
  CHECK(upstream.stats().bad_deallocations == 0);
  MESSAGE(cfg.threads, " threads: ", private_left, " private entries (", private_bytes,
          " bytes) left, ", st.shuffles, " shuffles, ", st.key_rotations, " key rotations");
}

}  // namespace

TEST_SUITE("concurrency") {

TEST_CASE("many threads renting, writing, freeing, shuffling and rotating keys lose nothing") {
  MEMSHUFFLE_TEST_SEED(seed);  // each thread's choices derive from it
  for (const config cfg : {config{2, cipher_kind::aes_256_ctr, false},
                           config{4, cipher_kind::aes_256_gcm, true},
                           config{8, cipher_kind::aes_256_ctr, true},
                           config{3, cipher_kind::none, false},
                           config{4, cipher_kind::aes_256_ctr, false, 1},
                           config{5, cipher_kind::aes_256_ctr, true, 3, false}}) {
    INFO(cfg.threads, " threads, cipher ", static_cast<int>(cfg.cipher), ", shuffle on return ",
         cfg.on_return, ", ", cfg.shards, " shards, upstream thread safe ", cfg.upstream_thread_safe);
    run(cfg, seed);
  }
}

}  // TEST_SUITE
