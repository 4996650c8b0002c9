// Fault injection: every shuffler operation that can need memory is run with the N-th
// allocation failing, for N = 0, 1, 2, ... until it runs without a failure. Two
// sources fail in turn: the upstream resource (arenas, plaintext windows), and the
// global operator new (the handle table, key slots, shuffle bookkeeping). After each
// failure the shuffler must be exactly as before (values, handle validity, the stats
// of live entries, memory held), or - for the calls that never throw - have done the
// documented fallback, and nothing may leak.
#include <doctest/doctest.h>

#include <memshuffle/exception_test.hpp>
#include <memshuffle/shuffler.hpp>
#include <memshuffle/tracking_resource.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <cstring>
#include <map>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "test/support/cipher_kinds.hpp"
#include "test/support/failing_new.hpp"
#include "test/support/recording_resource.hpp"

namespace {

using namespace memshuffle;
using memshuffle::testing::all_ciphers;
using memshuffle::testing::recording_resource;

// Where a failure is injected: the shuffler's upstream, or operator new.
enum class source { upstream, heap };

const char* name(source s) { return s == source::upstream ? "upstream" : "operator new"; }
const char* name(cipher_kind c) {
  return c == cipher_kind::none ? "none" : c == cipher_kind::aes_256_ctr ? "aes_256_ctr" : "aes_256_gcm";
}

struct state {
  std::map<handle, std::vector<std::byte>> values;
  std::vector<bool> valid;  // of every handle ever made, in order
  std::size_t live_entries, live_bytes, pinned_entries, pending_free, reserved_bytes, arenas;
  std::size_t upstream_bytes, upstream_allocations;
  bool operator==(const state&) const = default;
};

// A shuffler with a few entries of several sizes and alignments (one larger than an
// arena), some freed and not yet dropped, one rented for the whole test; the model of
// what every entry holds; and the resources that inject failures and check for leaks.
struct fixture {
  recording_resource recording;        // fails on demand
  tracking_resource upstream{&recording};  // the shuffler's upstream: counts, finds leaks
  tracking_resource window{&recording};    // plaintext windows, when used
  std::optional<shuffler> s;
  std::map<handle, std::vector<std::byte>> model;
  std::vector<handle> all;  // every handle made, freed ones too
  std::optional<lease<std::uint64_t>> pinned;
  std::byte next{1};

  explicit fixture(cipher_kind cipher, bool windows = false, bool on_return = false) {
    s.emplace(shuffler_options{.cipher = cipher,
                               .shuffle_on_return = on_return,
                               .arena_size = 1024,
                               .plaintext_resource = windows ? &window : nullptr,
                               .plaintext_in_place = !windows},
              &upstream);
    for (std::size_t n : {8u, 24u, 200u, 2000u}) add(s->alloc<std::uint64_t>(n / 8));
    add(s->create<std::uint32_t>());
    struct alignas(256) wide { std::byte b[256]; };
    add(s->create<wide>());
    for (int i = 0; i < 3; ++i) add(s->alloc<std::byte>(48));
    // Two freed entries wait for the next shuffle.
    for (int i = 0; i < 2; ++i) {
      const handle h = all[all.size() - 1 - static_cast<std::size_t>(i)];
      s->free(h);
      model.erase(h);
    }
    pinned.emplace(s->rent<std::uint64_t>(all[0]));
  }

  ~fixture() {
    pinned.reset();
    s.reset();
    CHECK_FALSE(upstream.has_leaks());
    CHECK_FALSE(window.has_leaks());
    CHECK(upstream.stats().bad_deallocations == 0);
    CHECK(recording.mismatches() == 0);
  }

  // A new entry, written with a pattern unlike every other entry's.
  void add(handle h) {
    std::vector<std::byte> v(s->size_of(h));
    for (auto& b : v) b = next = std::byte{static_cast<unsigned char>(std::to_integer<int>(next) * 5 + 3)};
    s->write(h, v);
    model[h] = v;
    all.push_back(h);
  }

  // Everything a caller can observe, read without changing anything the comparison
  // looks at (a read with shuffle-on-return on would move the entry).
  state observe() {
    state st{};
    const auto stats = s->stats();
    st.live_entries = stats.live_entries;
    st.live_bytes = stats.live_bytes;
    st.pinned_entries = stats.pinned_entries;
    st.pending_free = stats.pending_free_entries;
    st.reserved_bytes = stats.reserved_bytes;
    st.arenas = stats.arenas;
    st.upstream_bytes = upstream.stats().current_bytes;
    st.upstream_allocations = upstream.stats().current_allocations;
    s->set_shuffle_on_return(false);
    for (handle h : all) {
      st.valid.push_back(s->valid(h));
      if (!s->valid(h)) continue;
      std::vector<std::byte> v(s->size_of(h));
      s->read(h, v);
      st.values[h] = std::move(v);
    }
    return st;
  }

  void restore_policy(bool on_return) { s->set_shuffle_on_return(on_return); }

  // The values the model expects, as observe() reports them.
  void check_values(const state& st) const {
    CHECK(st.values == model);
    CHECK(st.live_entries == model.size());
    // Nothing held upstream but the arenas (and no window outlives its lease but the
    // pinned entry's).
    CHECK(st.upstream_bytes == st.reserved_bytes);
  }
};

// The failure source as the exception-test helper drives it.
failure_injection injection(fixture& f, source src) {
  if (src == source::upstream)
    return {[&f](std::size_t n) { f.recording.fail_after(n); }, [&f] { f.recording.fail_never(); },
            [&f] { return f.recording.failures_injected(); }, nullptr};
  return {[](std::size_t n) { testing::failing_new::fail_at(static_cast<long>(n)); },
          [] { testing::failing_new::fail_at(-1); },
          [] { return static_cast<std::size_t>(testing::failing_new::failures()); }, nullptr};
}

// Runs op with the N-th allocation from src failing, for N = 0, 1, ... until op runs
// with no failure injected (memshuffle::exception_test). An op that throws
// std::bad_alloc must leave the fixture's state exactly as before (what the upstream
// has outstanding included, so nothing leaked); one that completes despite a failure
// must satisfy `completed` (and so must the final, failure-free run). Returns how many
// runs met a failure.
int fail_each_allocation(fixture& f, source src, bool on_return,
                         const std::function<void()>& op,
                         const std::function<void()>& completed) {
  state before;
  exception_test_options o;
  o.before_run = [&](std::size_t) {
    before = f.observe();
    f.restore_policy(on_return);
  };
  o.after_failure = [&](std::size_t n) {
    CAPTURE(n);
    const state after = f.observe();
    f.restore_policy(on_return);
    CHECK(after == before);
  };
  o.after_completion = [&](std::size_t n) {
    CAPTURE(n);
    completed();
    f.check_values(f.observe());
    f.restore_policy(on_return);
  };
  const auto result = exception_test(injection(f, src), op, o);
  CHECK(result.completed);
  return static_cast<int>(result.failed_runs + result.absorbed_runs);
}

constexpr source sources[] = {source::upstream, source::heap};

// Runs body(cipher, source) for every cipher and failure source, with both captured.
void for_each_setup(const std::function<void(cipher_kind, source)>& body) {
  for (cipher_kind c : all_ciphers)
    for (source src : sources) {
      INFO("cipher ", std::string(name(c)), ", failing ", std::string(name(src)));
      body(c, src);
    }
}

}  // namespace

TEST_SUITE("shuffler") {

TEST_CASE("a failed alloc or create leaves the shuffler exactly as it was") {
  for_each_setup([](cipher_kind c, source src) {
    fixture f(c);
    handle made = invalid_handle;
    auto done = [&] {
      REQUIRE(made != invalid_handle);
      f.model[made] = std::vector<std::byte>(f.s->size_of(made));  // reads as zeros
      f.all.push_back(made);
    };
    // Larger than what is left in the arena being filled: needs a new arena.
    const int alloc_failures = fail_each_allocation(f, src, false,
        [&] { made = f.s->alloc<std::uint64_t>(100); }, done);
    const int create_failures = fail_each_allocation(f, src, false,
        [&] { made = f.s->create<std::array<std::uint64_t, 120>>(); }, done);
    CHECK(alloc_failures >= 1);  // the test injected something
    CHECK(create_failures >= 1);
  });
}

TEST_CASE("a failed shuffle leaves every entry where and as it was") {
  for_each_setup([](cipher_kind c, source src) {
    fixture f(c);
    std::uint64_t completed = 0;
    // A failure once entries have moved is absorbed (the entries without room stay
    // where they are): that run completes, and counts one shuffle.
    const int failures = fail_each_allocation(f, src, false, [&] { f.s->shuffle(); },
                                              [&] { CHECK(f.s->stats().shuffles == ++completed); });
    CHECK(completed >= 1);
    CHECK(f.s->stats().pending_free_entries == 0);  // the freed entries were dropped
    if (src == source::upstream) CHECK(failures >= 1);
  });
}

TEST_CASE("a failed incremental shuffle step leaves every entry where and as it was") {
  for_each_setup([](cipher_kind c, source src) {
    fixture f(c);
    int failures = 0;
    // Step by step until one pass completes; every step is tried with each failure.
    while (f.s->stats().shuffles == 0)
      failures += fail_each_allocation(f, src, false, [&] { f.s->shuffle(64); }, [] {});
    if (src == source::upstream) CHECK(failures >= 1);
  });
}

TEST_CASE("a rent and return under failing memory keeps the value, with shuffle on return") {
  for (bool windows : {false, true}) {
    INFO("plaintext windows: ", windows);
    for_each_setup([&](cipher_kind c, source src) {
      fixture f(c, windows, true);
      const handle h = f.all[3];  // larger than an arena: every move needs a new one
      std::byte mark{0x40};
      int failures = 0;
      auto rent_write_return = [&] {
        auto l = f.s->rent<std::uint64_t>(h);  // may throw: then nothing changed
        mark = std::byte{static_cast<unsigned char>(std::to_integer<int>(mark) + 1)};
        std::memset(l.get(), std::to_integer<int>(mark), f.s->size_of(h));
        f.model[h].assign(f.model[h].size(), mark);
        // The return never throws; if the move cannot get memory the entry stays.
      };
      failures = fail_each_allocation(f, src, true, rent_write_return, [] {});
      CHECK(f.s->stats().entries_relocated_on_return >= 1);
      if (src == source::upstream) CHECK(failures >= 1);
    });
  }
}

TEST_CASE("a key rotation under failing memory keeps every entry readable") {
  for_each_setup([](cipher_kind c, source src) {
    fixture f(c);
    std::uint64_t rotations = 0;
    fail_each_allocation(f, src, false, [&] { f.s->rotate_key(); },
                         [&] { rotations = f.s->stats().key_rotations; });
    CHECK(rotations >= 1);
    key_type key{};
    salt_type salt{};
    key[0] = std::byte{7};
    salt[1] = std::byte{9};
    fail_each_allocation(f, src, false, [&] { f.s->rotate_key(key, salt); }, [] {});
    CHECK(f.s->stats().key_rotations >= 2);
  });
}

}  // TEST_SUITE

TEST_SUITE("shuffler") {

// A failed alloc must not take a handle-table slot (nor use up a generation) before the
// allocation that throws: the next alloc then gets the slot and handle it would have
// had. Stats and values alone do not show it, so a twin shuffler that never saw the
// failure is the reference: the same slot count (metadata_bytes) and the same step from
// the last handle to the next one (handles of two shufflers differ only in their tag).
// Self-contained: it uses nothing else of this file.
TEST_CASE("a failed alloc takes no handle-table slot: the next alloc gets the handle it would have had") {
  using memshuffle::cipher_kind;
  using memshuffle::handle;
  using memshuffle::shuffler;
  using memshuffle::shuffler_options;
  namespace failing_new = memshuffle::testing::failing_new;
  for (cipher_kind c : all_ciphers) {
    for (bool upstream_fails : {true, false}) {
      INFO("cipher ", static_cast<int>(c), (upstream_fails ? ", failing: upstream" : ", failing: operator new"));
      int failures = 0;
      for (long n = 0; n < 200; ++n) {
        CAPTURE(n);
        memshuffle::testing::recording_resource up_a, up_b;
        shuffler a(shuffler_options{.cipher = c}, &up_a), b(shuffler_options{.cipher = c}, &up_b);
        handle last_a{}, last_b{};
        for (int i = 0; i < 64; ++i) {  // the table's first 64 slots, all taken
          last_a = a.alloc<std::byte>(100);
          last_b = b.alloc<std::byte>(100);
        }
        bool threw = false;
        if (upstream_fails) up_a.fail_after(static_cast<std::size_t>(n));
        else failing_new::fail_at(n);
        try {
          a.alloc<std::byte>(std::size_t{100} << 10);  // larger than an arena: a new one
        } catch (const std::bad_alloc&) {
          threw = true;
        }
        up_a.fail_never();
        failing_new::fail_at(-1);
        if (!threw) break;
        ++failures;
        CHECK(a.stats().metadata_bytes == b.stats().metadata_bytes);
        CHECK(a.stats().live_entries == b.stats().live_entries);
        const handle next_a = a.alloc<std::byte>(16), next_b = b.alloc<std::byte>(16);
        CHECK(a.stats().metadata_bytes == b.stats().metadata_bytes);
        CHECK(static_cast<std::uint64_t>(next_a) - static_cast<std::uint64_t>(last_a) ==
              static_cast<std::uint64_t>(next_b) - static_cast<std::uint64_t>(last_b));
        CHECK(a.size_of(next_a) == 16);
      }
      CHECK(failures >= 1);
    }
  }
}

}  // TEST_SUITE

TEST_SUITE("shuffler") {

// Returning an entry needs no memory, so no entry is left plaintext after its last lease
// ends. A fresh GCM shuffler has sealed nothing yet, so its cipher has no GCM object in
// its pool: the returns below are the first seals, made while operator new refuses
// everything. Each of the entries is rented twice; with `threads`, the leases of each
// entry are held by two threads, and all threads return at once.
TEST_CASE("every GCM entry is sealed when its last lease ends, even with no memory to be had") {
  using namespace memshuffle;
  namespace failing_new = memshuffle::testing::failing_new;
  constexpr std::size_t entries = 6;
  for (bool threads : {false, true}) {
    INFO("returned from several threads at once: ", threads);
    shuffler s(shuffler_options{.cipher = cipher_kind::aes_256_gcm});
    std::vector<handle> hs;
    for (std::size_t i = 0; i < entries; ++i) hs.push_back(s.alloc<std::byte>(40 + 24 * i));
    // Thread t holds a lease on entry t and one on entry t + 1: every entry ends when
    // the later of two threads returns it.
    std::vector<std::vector<lease<std::byte>>> held(entries);
    for (std::size_t i = 0; i < entries; ++i) {
      held[i].push_back(s.rent<std::byte>(hs[i]));
      held[(i + 1) % entries].push_back(s.rent<std::byte>(hs[i]));
      std::memset(held[i].back().get(), static_cast<int>(0x31 + i), s.size_of(hs[i]));
    }
    REQUIRE(s.stats().pinned_entries == entries);
    const std::uint64_t encryptions = s.stats().encryptions;
    const long failures = failing_new::failures();

    std::atomic<bool> go{false};
    std::vector<std::thread> workers;
    if (threads)
      for (auto& mine : held)
        workers.emplace_back([&go, &mine] {
          while (!go.load()) std::this_thread::yield();
          for (auto& l : mine) l.reset();
        });
    failing_new::refuse_from(1);  // from here on every operator new throws
    go = true;
    for (auto& w : workers) w.join();
    for (auto& mine : held)
      for (auto& l : mine) l.reset();
    failing_new::refuse_from(0);

    CHECK(failing_new::failures() > failures);  // a GCM object was asked for and refused
    CHECK(s.stats().pinned_entries == 0);
    CHECK(s.stats().encryptions == encryptions + entries);
    for (std::size_t i = 0; i < entries; ++i) {
      CAPTURE(i);
      std::vector<std::byte> v(s.size_of(hs[i]));
      s.read(hs[i], v);
      CHECK(std::all_of(v.begin(), v.end(), [&](std::byte b) { return b == std::byte(0x31 + i); }));
    }
  }
}

}  // TEST_SUITE
