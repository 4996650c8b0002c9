// Fuzzes the shuffler: the input chooses the options and then a sequence of alloc,
// create, rent (leases of several types, nested), rent_pointer/return_pointer, write,
// read, free, full and incremental shuffles, key rotations, failing upstream calls,
// and misuse (stale, garbage and foreign handles, wrong types, returns without a
// rent), in one to four shards, each entry allocated as a thread of some ordinal.
// After every operation each entry must hold exactly what a simple model says, every
// misuse must get its documented error and change nothing, and at the end nothing may
// be left with the upstream.
#include <memshuffle/shuffler.hpp>
#include <memshuffle/tracking_resource.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <vector>

#include "test/fuzz/fuzz_check.hpp"
#include "test/support/recording_resource.hpp"

namespace {

using memshuffle::handle;

struct align16 { alignas(16) std::byte b[16]; };
struct align64 { alignas(64) std::byte b[64]; };
struct align4k { alignas(4096) std::byte b[32]; };
struct big { std::byte b[600]; };  // larger than most entries: a wrong type

// Runs f, which must throw E; anything else (or nothing) is a finding.
template <class E, class F>
void expect_throw(F&& f) {
  try {
    f();
  } catch (const E&) {
    return;
  } catch (...) {
    FUZZ_CHECK(!"a different exception than documented");
  }
  FUZZ_CHECK(!"no exception where one is documented");
}

// A lease of any type, so leases of different types can be kept in one list.
struct any_lease {
  virtual ~any_lease() = default;
};
template <class T>
struct typed_lease : any_lease {
  explicit typed_lease(memshuffle::lease<T> l) : l(std::move(l)) {}
  memshuffle::lease<T> l;
};

struct entry {
  std::vector<std::byte> value;
  std::size_t alignment;
  int leases = 0;    // open leases (RAII)
  int pointers = 0;  // open rent_pointer calls
  std::byte* plaintext = nullptr;  // where it shows while rented
  int rents() const { return leases + pointers; }
};

struct open_lease {
  handle h;
  std::unique_ptr<any_lease> l;
};

// What the shuffler gets its memory from; outlives it, to be checked after it dies.
struct resources {
  memshuffle::testing::recording_resource recording;
  memshuffle::tracking_resource upstream{memshuffle::tracking_options{}, &recording};
  memshuffle::tracking_resource window{memshuffle::tracking_options{}, &recording};
};

class shuffler_fuzz {
 public:
  shuffler_fuzz(FuzzedDataProvider& in, resources& r)
      : in_(in),
        recording_(r.recording),
        upstream_(r.upstream),
        window_(r.window),
        shuffler_(options(), &upstream_),
        other_(memshuffle::shuffler_options{.cipher = memshuffle::cipher_kind::none}) {
    foreign_ = other_.alloc<std::uint64_t>(1);
  }

  void run() {
    while (in_.remaining_bytes() > 0) {
      step(in_.ConsumeIntegralInRange(0, 24));
      check();
    }
  }

  ~shuffler_fuzz() {
    leases_.clear();
    for (auto& [h, e] : entries_)
      for (; e.pointers > 0; --e.pointers) shuffler_.return_pointer(h);
  }

 private:
  memshuffle::shuffler_options options() {
    memshuffle::shuffler_options o;
    o.cipher = static_cast<memshuffle::cipher_kind>(in_.ConsumeIntegralInRange(0, 2));
    o.shuffle_on_return = in_.ConsumeBool();
    o.shuffle_every = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<std::size_t>(1, 16) : 0;
    o.shuffle_above_ratio = in_.ConsumeBool() ? 1.0 + in_.ConsumeIntegralInRange(0, 20) / 10.0 : 0;
    o.randomize_layout = in_.ConsumeBool();
    o.arena_size = in_.ConsumeIntegralInRange<std::size_t>(64, 8192);
    switch (in_.ConsumeIntegralInRange(0, 2)) {  // a window of ours, secret memory, in place
      case 0: o.plaintext_resource = &window_; break;
      case 1: break;
      default: o.plaintext_in_place = true; break;
    }
    o.rotate_key_every = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<std::size_t>(1, 32) : 0;
    o.shards = in_.ConsumeIntegralInRange<std::size_t>(1, 4);
    return o;
  }

  // A live entry (or entries_.end()).
  std::map<handle, entry>::iterator pick_entry() {
    if (entries_.empty()) return entries_.end();
    auto it = entries_.begin();
    std::advance(it, in_.ConsumeIntegralInRange<std::size_t>(0, entries_.size() - 1));
    return it;
  }

  std::vector<std::byte> random_bytes(std::size_t n) {
    std::vector<std::byte> v(n);
    memshuffle::fuzz::fill_pattern(v, in_.ConsumeIntegral<std::uint32_t>());
    return v;
  }

  template <class T>
  void alloc(std::size_t n) {
    const handle h = shuffler_.alloc<T>(n);
    FUZZ_CHECK(h != memshuffle::invalid_handle);
    FUZZ_CHECK(!entries_.contains(h));
    entries_[h] = entry{std::vector<std::byte>(n * sizeof(T)), alignof(T)};
  }

  void alloc_any() {
    if (entries_.size() >= 48) return;
    const auto n = in_.ConsumeIntegralInRange<std::size_t>(1, 40);
    // As a thread of another ordinal: the entry goes to that thread's shard.
    memshuffle::detail::set_thread_ordinal(in_.ConsumeIntegralInRange<std::size_t>(0, 5));
    switch (in_.ConsumeIntegralInRange(0, 6)) {
      case 0: alloc<std::byte>(n * 8); break;
      case 1: alloc<std::uint32_t>(n); break;
      case 2: alloc<std::uint64_t>(n); break;
      case 3: alloc<align16>(n); break;
      case 4: alloc<align64>(1 + n % 4); break;
      case 5: alloc<align4k>(1); break;
      default: alloc<std::uint64_t>(1); break;  // as create<std::uint64_t>()
    }
  }

  // A rent of T when the entry fits it, else the documented type_error.
  template <class T>
  void rent_as(std::map<handle, entry>::iterator it) {
    const handle h = it->first;
    auto& e = it->second;
    if (sizeof(T) > e.value.size() || alignof(T) > e.alignment) {
      expect_throw<memshuffle::type_error>([&] { (void)shuffler_.rent<T>(h); });
      return;
    }
    auto l = shuffler_.rent<T>(h);
    FUZZ_CHECK(l.size() == e.value.size() / sizeof(T));
    auto* p = reinterpret_cast<std::byte*>(l.get());
    FUZZ_CHECK(reinterpret_cast<std::uintptr_t>(p) % alignof(T) == 0);
    if (e.rents() > 0) FUZZ_CHECK(p == e.plaintext);  // nested leases see one entry
    e.plaintext = p;
    ++e.leases;
    leases_.push_back({h, std::make_unique<typed_lease<T>>(std::move(l))});
  }

  void rent_any() {
    auto it = pick_entry();
    if (it == entries_.end()) return;
    switch (in_.ConsumeIntegralInRange(0, 5)) {
      case 0: rent_as<std::byte>(it); break;
      case 1: rent_as<std::uint64_t>(it); break;
      case 2: rent_as<align16>(it); break;
      case 3: rent_as<align64>(it); break;
      case 4: rent_as<align4k>(it); break;
      default: rent_as<big>(it); break;
    }
  }

  void end_lease() {
    if (leases_.empty()) return;
    const auto i = in_.ConsumeIntegralInRange<std::size_t>(0, leases_.size() - 1);
    const handle h = leases_[i].h;
    leases_.erase(leases_.begin() + static_cast<std::ptrdiff_t>(i));  // ends it
    auto& e = entries_.at(h);
    --e.leases;
    if (e.rents() == 0) e.plaintext = nullptr;
  }

  void rent_pointer() {
    auto it = pick_entry();
    if (it == entries_.end()) return;
    const handle h = it->first;
    auto& e = it->second;
    auto* p = shuffler_.rent_pointer<std::byte*>(h);
    if (e.rents() > 0) FUZZ_CHECK(p == e.plaintext);
    e.plaintext = p;
    ++e.pointers;
  }

  void return_pointer() {
    auto it = pick_entry();
    if (it == entries_.end()) return;
    const handle h = it->first;
    auto& e = it->second;
    if (e.pointers == 0) {  // not rented that way: a return without a rent
      if (e.leases == 0) expect_throw<memshuffle::lease_error>([&] { shuffler_.return_pointer(h); });
      return;
    }
    shuffler_.return_pointer(h);
    --e.pointers;
    if (e.rents() == 0) e.plaintext = nullptr;
  }

  // Writes through the plaintext of a rented entry.
  void mutate_rented() {
    auto it = pick_entry();
    if (it == entries_.end() || it->second.rents() == 0) return;
    auto& e = it->second;
    const auto bytes = random_bytes(e.value.size());
    std::memcpy(e.plaintext, bytes.data(), bytes.size());
    e.value = bytes;
  }

  void write() {
    auto it = pick_entry();
    if (it == entries_.end() || it->second.rents() > 0) return;
    const handle h = it->first;
    auto& e = it->second;
    const auto n = in_.ConsumeIntegralInRange<std::size_t>(0, e.value.size() + 1);
    const auto bytes = random_bytes(n);
    if (n > e.value.size()) {
      expect_throw<memshuffle::type_error>([&] { shuffler_.write(h, bytes); });
      return;
    }
    shuffler_.write(h, bytes);
    std::copy(bytes.begin(), bytes.end(), e.value.begin());  // a prefix; the rest stays
  }

  void free() {
    auto it = pick_entry();
    if (it == entries_.end()) return;
    const handle h = it->first;
    if (it->second.rents() > 0) {
      expect_throw<memshuffle::lease_error>([&] { shuffler_.free(h); });
      return;
    }
    shuffler_.free(h);
    FUZZ_CHECK(!shuffler_.valid(h));
    entries_.erase(it);
    stale_.push_back(h);
  }

  // Every call on a handle that names no entry of this shuffler gets
  // invalid_handle_error, and changes nothing.
  void misuse_handle(handle h) {
    using memshuffle::invalid_handle_error;
    FUZZ_CHECK(!shuffler_.valid(h));
    std::byte buf[8]{};
    switch (in_.ConsumeIntegralInRange(0, 6)) {
      case 0: expect_throw<invalid_handle_error>([&] { (void)shuffler_.rent<std::byte>(h); }); break;
      case 1: expect_throw<invalid_handle_error>([&] { (void)shuffler_.rent_pointer<void*>(h); }); break;
      case 2: expect_throw<invalid_handle_error>([&] { shuffler_.return_pointer(h); }); break;
      case 3: expect_throw<invalid_handle_error>([&] { shuffler_.free(h); }); break;
      case 4: expect_throw<invalid_handle_error>([&] { (void)shuffler_.size_of(h); }); break;
      case 5: expect_throw<invalid_handle_error>([&] { shuffler_.read(h, buf); }); break;
      default: expect_throw<invalid_handle_error>([&] { shuffler_.write(h, buf); }); break;
    }
  }

  void misuse() {
    switch (in_.ConsumeIntegralInRange(0, 4)) {
      case 0:
        if (!stale_.empty())
          misuse_handle(stale_[in_.ConsumeIntegralInRange<std::size_t>(0, stale_.size() - 1)]);
        break;
      case 1: {
        const handle h{in_.ConsumeIntegral<std::uint64_t>()};
        if (!entries_.contains(h)) misuse_handle(h);
        break;
      }
      case 2: misuse_handle(memshuffle::invalid_handle); break;
      case 3: misuse_handle(foreign_); break;
      default:
        expect_throw<memshuffle::type_error>([&] { (void)shuffler_.alloc<std::uint64_t>(0); });
    }
  }

  // The upstream (arenas, or the plaintext window) fails at its k-th allocation from
  // now: the call either succeeds or throws std::bad_alloc and changes nothing.
  void with_failing_upstream() {
    recording_.fail_after(in_.ConsumeIntegralInRange<std::size_t>(0, 3));
    try {
      switch (in_.ConsumeIntegralInRange(0, 5)) {
        case 0: alloc_any(); break;
        case 1: rent_any(); break;
        case 2: rent_pointer(); break;
        case 3: shuffler_.shuffle(); break;
        case 4: shuffler_.shuffle(in_.ConsumeIntegralInRange<std::size_t>(1, 4096)); break;
        default: end_lease(); break;  // never throws: a failed move leaves the entry
      }
    } catch (const std::bad_alloc&) {
    }
    recording_.fail_never();
  }

  void step(int op) {
    switch (op) {
      case 0: case 1: case 2: alloc_any(); break;
      case 3: case 4: rent_any(); break;
      case 5: case 6: end_lease(); break;
      case 7: rent_pointer(); break;
      case 8: return_pointer(); break;
      case 9: mutate_rented(); break;
      case 10: write(); break;
      case 11: free(); break;
      case 12: shuffler_.shuffle(); break;
      case 13: shuffler_.shuffle(in_.ConsumeIntegralInRange<std::size_t>(1, 4096)); break;
      case 14: shuffler_.rotate_key(); break;
      case 15: {
        memshuffle::key_type key;
        memshuffle::salt_type salt;
        for (auto& b : key) b = std::byte{in_.ConsumeIntegral<std::uint8_t>()};
        for (auto& b : salt) b = std::byte{in_.ConsumeIntegral<std::uint8_t>()};
        shuffler_.rotate_key(key, salt);
        break;
      }
      case 16: case 17: misuse(); break;
      case 18: with_failing_upstream(); break;
      case 19: shuffler_.set_shuffle_on_return(in_.ConsumeBool()); break;
      default: {  // read: all of it, a prefix, or too much (type_error)
        auto it = pick_entry();
        if (it == entries_.end() || it->second.rents() > 0) break;
        const handle h = it->first;
        auto& e = it->second;
        std::vector<std::byte> out(in_.ConsumeIntegralInRange<std::size_t>(0, e.value.size() + 1));
        if (out.size() > e.value.size()) {
          expect_throw<memshuffle::type_error>([&] { shuffler_.read(h, out); });
          break;
        }
        shuffler_.read(h, out);
        FUZZ_CHECK(std::equal(out.begin(), out.end(), e.value.begin()));
      }
    }
  }

  void check() {
    std::size_t bytes = 0, pinned = 0;
    for (auto& [h, e] : entries_) {
      FUZZ_CHECK(shuffler_.valid(h));
      FUZZ_CHECK(shuffler_.size_of(h) == e.value.size());
      bytes += e.value.size();
      if (e.rents() > 0) {
        ++pinned;
        FUZZ_CHECK(std::memcmp(e.plaintext, e.value.data(), e.value.size()) == 0);
      } else {
        std::vector<std::byte> out(e.value.size());
        shuffler_.read(h, out);
        FUZZ_CHECK(out == e.value);
      }
    }
    const auto s = shuffler_.stats();
    FUZZ_CHECK(s.live_entries == entries_.size());
    FUZZ_CHECK(s.live_bytes == bytes);
    FUZZ_CHECK(s.pinned_entries == pinned);
    FUZZ_CHECK(s.reserved_bytes <= upstream_.stats().current_bytes);
    FUZZ_CHECK(upstream_.stats().bad_deallocations == 0);
    FUZZ_CHECK(window_.stats().bad_deallocations == 0);
  }

  FuzzedDataProvider& in_;
  memshuffle::testing::recording_resource& recording_;
  memshuffle::tracking_resource& upstream_;
  memshuffle::tracking_resource& window_;
  memshuffle::shuffler shuffler_;
  memshuffle::shuffler other_;
  handle foreign_;
  std::map<handle, entry> entries_;
  std::vector<open_lease> leases_;
  std::vector<handle> stale_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  resources r;
  shuffler_fuzz(in, r).run();
  // The shuffler is gone: it gave back everything, and only what it had.
  for (const auto* t : {&r.upstream, &r.window}) {
    FUZZ_CHECK(!t->has_leaks());
    FUZZ_CHECK(t->stats().bad_deallocations == 0);
  }
  FUZZ_CHECK(r.recording.outstanding() == 0);
  return 0;
}
