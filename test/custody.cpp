// Custody (docs/security.md, "Custody" and "How custody is tested"), checked as an
// attacker would: the test reads every mapping of its own process that a core dump
// would write and counts the plaintext markers, raw keys, salts, GCM hash keys and AES-256
// key schedules it finds outside secret memory. It knows the secrets only in a mapping
// the scan skips. Also the fork rules, tried from a real child, and each path that must
// wipe plaintext, scanned at the shuffler level with resources that do not wipe.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <memshuffle/detail/sanitizers.hpp>
#include <memshuffle/shuffler.hpp>
#include <test/support/child_process.hpp>
#include <test/support/cipher_kinds.hpp>
#include <test/support/custody_helpers.hpp>
#include <test/support/custody_secrets.hpp>
#include <test/support/memory_scan.hpp>
#include <test/support/recording_resource.hpp>
#include <test/support/seed.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <functional>
#include <chrono>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace memshuffle;
using namespace memshuffle::testing;

namespace {

std::string name(cipher_kind c) {
  return c == cipher_kind::none ? "none" : c == cipher_kind::aes_256_ctr ? "AES-256-CTR" : "AES-256-GCM";
}

scan_report scan_for(const custody_secrets& k) {
  memory_scan scan;
  k.add_to(scan);
  return scan.run();
}

// Runs body(secrets, filled shuffler) for each cipher, under default options.
template <class Body>
void for_each_filled(std::uint64_t seed, Body&& body) {
  for (cipher_kind c : encrypting_ciphers) {
    INFO(name(c));
    custody_secrets k(seed);
    auto f = fill(k, c, seed);
    body(k, f);
  }
}

// For the wipe paths: the plaintext alone (the keys are the other tests' business).
scan_report scan_for_plaintext(const custody_secrets& k) {
  memory_scan scan;
  scan.add("plaintext marker", k.marker());
  return scan.run();
}

// A plaintext resource that never wipes and keeps what it is given back, so the scan
// sees whatever the shuffler did not wipe.
struct non_wiping_resource : recording_resource {
  non_wiping_resource() { keep_freed(true); }
};


// Runs fn in a forked child; what it writes to the pipe is returned with the status.
template <class F>
std::pair<int, std::string> in_child(F&& fn) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const int status = run_in_child([&] {
    ::close(fds[0]);
    std::string out;
    const bool ok = fn(out);
    for (std::size_t at = 0; at < out.size();) {
      const ssize_t n = ::write(fds[1], out.data() + at, out.size() - at);
      if (n <= 0) break;
      at += static_cast<std::size_t>(n);
    }
    return ok;
  });
  ::close(fds[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  return {status, text};
}

// Whether p[0, n) is gone in this process: not mapped, or zeros.
bool gone(const void* p, std::size_t n) {
  for (const mapping& m : read_mappings()) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    if (a >= m.begin && a < m.end) {
      if (m.perms[0] != 'r') return true;
      std::vector<std::byte> copy(n);
      raw_copy_to(copy.data(), p, n);
      return std::all_of(copy.begin(), copy.end(), [](std::byte b) { return b == std::byte{0}; });
    }
  }
  return true;
}

template <class F>
bool throws_fork_error(F&& f) {
  try {
    f();
  } catch (const fork_error&) {
    return true;
  } catch (...) {
  }
  return false;
}

}  // namespace

TEST_SUITE("custody") {

TEST_CASE("the test's own secrets leave no copy where the scan looks") {
  MEMSHUFFLE_TEST_SEED(seed);
  custody_secrets k(seed);  // computes both hash keys with Crypto++
  hidden_bytes plaintext(4096);
  k.fill_blocks(plaintext.data(), plaintext.size(), 7);
  check_clean(scan_for(k));
}

TEST_CASE("a filled shuffler at rest leaves no plaintext, key, salt, hash key or key schedule outside secret memory") {
  MEMSHUFFLE_TEST_SEED(seed);
  for_each_filled(seed, [](const custody_secrets& k, filled_shuffler& f) {
    CHECK(k.entry_holds(*f.s, f.handles[4321], 4321));
    check_clean(scan_for(k));
  });
}

TEST_CASE("with one lease open the plaintext lies only in its window, and the window in secret memory") {
  MEMSHUFFLE_TEST_SEED(seed);
  for_each_filled(seed, [](const custody_secrets& k, filled_shuffler& f) {
    auto l = f.s->rent<std::byte>(f.handles[17]);
    CHECK(in_secret_memory(l.get()));
    check_clean(scan_for(k));
  });
}

TEST_CASE("after a key rotation, random or to a given key, nothing is left outside secret memory") {
  MEMSHUFFLE_TEST_SEED(seed);
  for_each_filled(seed, [](const custody_secrets& k, filled_shuffler& f) {
    f.s->rotate_key();
    check_clean(scan_for(k));
    f.s->rotate_key(k.key(1), k.salt(1));
    check_clean(scan_for(k));
    CHECK(k.entry_holds(*f.s, f.handles[9999], 9999));
  });
}

TEST_CASE("after the shuffler is destroyed nothing it held is left outside secret memory") {
  MEMSHUFFLE_TEST_SEED(seed);
  for_each_filled(seed, [](const custody_secrets& k, filled_shuffler& f) {
    auto l = f.s->rent<std::byte>(f.handles[5]);  // a window open until just before the end
    l = {};
    f.s.reset();
    check_clean(scan_for(k));
  });
}

TEST_CASE("while a rotation runs on another thread no plaintext or key lies outside secret memory where it stops") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  for (cipher_kind c : encrypting_ciphers) {
    for (bool windows : {false, true}) {
      INFO(name(c), std::string(windows ? ", with a plaintext_resource" : ", default options"));
      custody_secrets k(seed);
      non_wiping_resource plaintext;
      auto f = fill(k, c, seed, std::pmr::get_default_resource(), windows ? &plaintext : nullptr, true);
      const auto t0 = std::chrono::steady_clock::now();
      f.s->rotate_key(k.key(1), k.salt(1));
      const auto rotation = std::chrono::steady_clock::now() - t0;

      thread_stopper stopper;
      std::atomic<bool> done{false};
      std::thread rotor([&] {
        hidden_bytes stack(256 * 1024);
        thread_stopper::prepare_this_thread(stack);
        for (int i = 0; !done.load(); ++i) {
          if (i % 3 == 0) f.s->rotate_key(k.key(0), k.salt(0));
          else if (i % 3 == 1) f.s->rotate_key(k.key(1), k.salt(1));
          else f.s->rotate_key();
        }
        thread_stopper::forget_this_thread();
      });
      std::size_t most_schedules = 0;
      // Under a sanitizer a scan takes seconds: fewer stops keep the test short.
      const int stops = detail::address_sanitizer || detail::thread_sanitizer ? 2 : 6;
      for (int stop = 0; stop < stops; ++stop) {
        std::this_thread::sleep_for(std::chrono::nanoseconds(rng() % std::max<std::int64_t>(1, rotation.count())));
        REQUIRE(stopper.stop(rotor));
        const auto r = scan_for(k);
        stopper.resume();
        INFO("stop ", stop);
        // While the call runs, only plaintext and the raw keys are forbidden outside
        // secret memory; a schedule, a salt or H may be in use.
        check_clean(r, [](const std::string& item) { return item == "plaintext marker" || item.starts_with("raw key"); });
        most_schedules = std::max(most_schedules, r.count(schedule_item));
      }
      done.store(true);
      rotor.join();
      MESSAGE("at most ", most_schedules, " key schedules in use at a stop; ", stopper_timeouts.load(),
              " stops ended by the time limit");
      CHECK(k.entry_holds(*f.s, f.handles.back(), filled_entries));
      CHECK(plaintext.mismatches() == 0);
    }
  }
}

TEST_CASE("a full shuffle wipes a freed entry that shares an arena with a rented one") {
  MEMSHUFFLE_TEST_SEED(seed);
  for (cipher_kind c : all_ciphers) {
    INFO(name(c));
    custody_secrets k(seed);
    recording_resource upstream;
    auto s = k.make(c, &upstream);
    const handle kept = s->alloc<std::byte>(64), gone = s->alloc<std::byte>(64);
    k.write_entry(*s, kept, 1);
    // The freed entry's bytes as they lie in the arena (plaintext under none).
    const located at = locate(upstream, [&](int t) { k.write_entry(*s, gone, 2 + static_cast<std::uint32_t>(t)); });
    REQUIRE(at.p != nullptr);
    REQUIRE(upstream.live_blocks().size() == 1);  // one arena holds both
    hidden_bytes left(64);
    raw_copy_to(left.data(), at.p, 64);
    memory_scan scan;
    scan.add("the freed entry's bytes", left.span());
    const auto before = scan.run();
    INFO(before.where());
    REQUIRE(before.count("the freed entry's bytes") == 1);

    auto l = s->rent<std::byte>(kept);
    s->free(gone);
    s->shuffle();
    const auto r = scan.run();
    INFO(r.where());
    CHECK(r.count("the freed entry's bytes") == 0);
  }
}

TEST_CASE("an entry's plaintext is wiped when its sealed<T> ends while it is rented") {
  MEMSHUFFLE_TEST_SEED(seed);
  for (bool windows : {false, true}) {
    INFO(std::string(windows ? "a plaintext_resource that does not wipe" : "default options"));
    custody_secrets k(seed);
    non_wiping_resource plaintext;
    auto s = k.make(cipher_kind::aes_256_ctr, std::pmr::get_default_resource(), windows ? &plaintext : nullptr);
    for (bool by_pointer : {false, true}) {
      std::optional<sealed<std::array<std::byte, 256>>> e(std::in_place, *s);
      const handle h = e->id();
      if (by_pointer) {
        auto* p = s->rent_pointer<std::array<std::byte, 256>*>(h);
        k.fill_blocks(p->data(), p->size(), 3);
        e.reset();  // ends while rented: the entry goes when it is returned
        s->return_pointer(h);
      } else {
        auto l = e->open();
        k.fill_blocks(l->data(), l->size(), 3);
        e.reset();
      }
      CHECK_FALSE(s->valid(h));
      check_clean(scan_for_plaintext(k));
    }
  }
}

TEST_CASE("a plaintext window is wiped before it goes back to its resource") {
  MEMSHUFFLE_TEST_SEED(seed);
  for (cipher_kind c : all_ciphers) {
    INFO(name(c));
    custody_secrets k(seed);
    non_wiping_resource plaintext;
    recording_resource upstream;
    auto s = k.make(c, &upstream, &plaintext);
    const handle h = s->alloc<std::byte>(1000);
    k.write_entry(*s, h, 5);                // a window written and returned
    CHECK(k.entry_holds(*s, h, 5));          // one only read
    CHECK(plaintext.allocations() >= 2);
    CHECK(plaintext.outstanding() == 0);
    CHECK_FALSE(plaintext.contains(k.marker()));
    if (c != cipher_kind::none) check_clean(scan_for_plaintext(k));
  }
}


TEST_CASE("a child after fork() holds no plaintext, key or key schedule, not even in secret memory") {
  MEMSHUFFLE_TEST_SEED(seed);
  for_each_filled(seed, [](const custody_secrets& k, filled_shuffler& f) {
    auto l = f.s->rent<std::byte>(f.handles[3]);  // a window open across the fork
    const auto [status, text] = in_child([&](std::string& out) {
      memory_scan scan;
      k.add_to(scan);
      scan.include_secret();
      const auto r = scan.run();
      out = r.summary() + "\n" + r.where();
      bool clean = gone(l.get(), l.size());
      if (!clean) out += "the open window is still there\n";
      for (const scan_item& i : r.items) clean = clean && i.count == 0;
      return clean;
    });
    MESSAGE("in the child: ", text);
    CHECK_MESSAGE(exited_with(status, 0), describe(status));
    CHECK(k.entry_holds(*f.s, f.handles[4], 4));  // the parent goes on
  });
}

TEST_CASE("in a child after fork() every call of the shuffler throws fork_error, and the parent goes on") {
  MEMSHUFFLE_TEST_SEED(seed);
  for (cipher_kind c : encrypting_ciphers) {
    INFO(name(c));
    custody_secrets k(seed);
    auto s = k.make(c, std::pmr::get_default_resource());
    const handle h = s->alloc<std::byte>(64);
    k.write_entry(*s, h, 1);
    std::optional<lease<std::byte>> open(s->rent<std::byte>(s->alloc<std::byte>(32)));
    const auto [status, text] = in_child([&](std::string& out) {
      std::array<std::byte, 16> buf{};
      const std::pair<const char*, std::function<void()>> calls[] = {
          {"alloc", [&] { s->alloc<std::byte>(16); }},
          {"create", [&] { s->create<int>(); }},
          {"rent", [&] { s->rent<std::byte>(h); }},
          {"rent_pointer", [&] { s->rent_pointer<std::byte*>(h); }},
          {"read", [&] { s->read(h, buf); }},
          {"write", [&] { s->write(h, buf); }},
          {"free", [&] { s->free(h); }},
          {"size_of", [&] { s->size_of(h); }},
          {"shuffle", [&] { s->shuffle(); }},
          {"shuffle(budget)", [&] { s->shuffle(100); }},
          {"rotate_key", [&] { s->rotate_key(); }},
          {"rotate_key(key, salt)", [&] { s->rotate_key(k.key(1), k.salt(1)); }},
      };
      bool all = true;
      for (const auto& [what, call] : calls)
        if (!throws_fork_error(call)) {
          out += std::string(what) + " did not throw fork_error\n";
          all = false;
        }
      open.reset();  // a lease ending in the child, then the shuffler itself
      s.reset();
      return all;
    });
    INFO(text);
    CHECK_MESSAGE(exited_with(status, 0), describe(status));
    open.reset();
    CHECK(k.entry_holds(*s, h, 1));
    k.write_entry(*s, h, 2);
    CHECK(k.entry_holds(*s, h, 2));
  }
}

TEST_CASE("a child after fork() never encrypts under the keystream the parent goes on to use") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  constexpr int writes = 50;
  constexpr std::size_t n = 64;
  for (cipher_kind c : encrypting_ciphers) {
    INFO(name(c));
    custody_secrets k(seed);
    recording_resource upstream;
    auto s = k.make(c, &upstream);
    const handle h = s->alloc<std::byte>(n);
    std::vector<std::array<std::byte, n>> data(writes);
    for (auto& d : data) std::generate(d.begin(), d.end(), [&] { return std::byte(rng()); });
    // Where the entry's ciphertext lies: what each write changes in the arena.
    const located at = locate(upstream, [&](int t) { s->write(h, data[static_cast<std::size_t>(t)]); });
    REQUIRE(at.p != nullptr);
    auto ciphertext = [&] {
      std::array<std::byte, n> out{};
      raw_copy_to(out.data(), at.p, n);
      return out;
    };
    // The child writes d, the parent then writes d ^ 0xFF: under one keystream the two
    // ciphertexts differ by 0xFF in every byte, which anyone who sees both can tell.
    const auto [status, text] = in_child([&](std::string& out) {
      for (const auto& d : data) {
        try {
          s->write(h, d);
        } catch (const fork_error&) {
          continue;
        }
        const auto ct = ciphertext();
        out.append(reinterpret_cast<const char*>(ct.data()), n);
      }
      return true;
    });
    CHECK(exited_with(status, 0));
    const std::size_t child_writes = text.size() / n;
    std::size_t reused = 0;
    for (std::size_t i = 0; i < writes; ++i) {
      auto flipped = data[i];
      for (auto& b : flipped) b ^= std::byte{0xFF};
      s->write(h, flipped);
      if (i >= child_writes) continue;
      const auto mine = ciphertext();
      bool same_keystream = true;
      for (std::size_t j = 0; j < n; ++j)
        same_keystream = same_keystream && (std::byte(text[i * n + j]) ^ mine[j]) == std::byte{0xFF};
      reused += same_keystream;
    }
    MESSAGE(child_writes, " of ", writes, " writes went through in the child; ", reused,
            " reused the parent's keystream");
    CHECK(child_writes == 0);
    CHECK(reused == 0);
  }
}

}  // TEST_SUITE
