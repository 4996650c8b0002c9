// The memshuffle demo (scripts/demo): the pmr resources under ordinary containers,
// then the shuffler's handles, leases and compaction, then encryption at rest.
#include <memshuffle/arena_resource.hpp>
#include <memshuffle/resource_adaptors.hpp>
#include <memshuffle/shuffler.hpp>
#include <memshuffle/tracking_resource.hpp>

#include <boost/container/pmr/deque.hpp>
#include <boost/container/pmr/map.hpp>
#include <boost/container/pmr/vector.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <memory_resource>
#include <random>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using namespace memshuffle;

void heading(const char* title) { std::printf("\n== %s ==\n", title); }

// ---- 1. pmr resources -------------------------------------------------------------

constexpr int elements = 100'000;

// Fills one container through `fill`, from a fresh arena over a tracking_resource,
// and prints what the arena saw (the container's requests) beside what the tracking
// resource saw (the arena's chunks).
void fill_and_report(const char* what, const std::function<void(std::pmr::memory_resource*)>& fill) {
  tracking_resource upstream(std::pmr::new_delete_resource());
  {
    arena_resource arena(&upstream);
    fill(&arena);
    arena_stats a = arena.stats();
    tracking_stats t = upstream.stats();
    std::printf("  %-38s %7zu %9zu %6zu | %6zu %9zu %6.2f\n", what, a.allocations,
                a.peak_bytes_used, a.chunks, t.total_allocations, t.peak_bytes,
                double(t.peak_bytes) / double(a.peak_bytes_used));
  }
  if (upstream.has_leaks()) upstream.report(std::cout);
}

void pmr_containers() {
  heading("1. std::pmr and boost::container::pmr containers on an arena_resource");
  std::printf("Each container gets %d elements from its own arena_resource, which takes\n"
              "its chunks from a tracking_resource over new/delete (boost containers through\n"
              "boost_resource_adaptor). Left: what the arena served; right: what it took.\n\n",
              elements);
  std::printf("  %-38s %-24s | %s\n", "", "arena_resource served", "tracking_resource saw");
  std::printf("  %-38s %7s %9s %6s | %6s %9s %6s\n", "container", "allocs", "peak used", "chunks",
              "allocs", "peak held", "held/used");
  fill_and_report("std::pmr::vector<int>", [](std::pmr::memory_resource* r) {
    std::pmr::vector<int> v(r);
    for (int i = 0; i < elements; ++i) v.push_back(i);
  });
  fill_and_report("std::pmr::map<int, pmr::string>", [](std::pmr::memory_resource* r) {
    std::pmr::map<int, std::pmr::string> m(r);
    for (int i = 0; i < elements; ++i) m.emplace(i, "value number " + std::to_string(i));
  });
  fill_and_report("std::pmr::unordered_map<int, int>", [](std::pmr::memory_resource* r) {
    std::pmr::unordered_map<int, int> m(r);
    for (int i = 0; i < elements; ++i) m.emplace(i, i);
  });
  fill_and_report("boost::container::pmr::vector<int>", [](std::pmr::memory_resource* r) {
    boost_resource_adaptor bridge(r);
    boost::container::pmr::vector<int> v(&bridge);
    for (int i = 0; i < elements; ++i) v.push_back(i);
  });
  fill_and_report("boost::container::pmr::map<int, int>", [](std::pmr::memory_resource* r) {
    boost_resource_adaptor bridge(r);
    boost::container::pmr::map<int, int> m(&bridge);
    for (int i = 0; i < elements; ++i) m.emplace(i, i);
  });
  fill_and_report("boost::container::pmr::deque<int>", [](std::pmr::memory_resource* r) {
    boost_resource_adaptor bridge(r);
    boost::container::pmr::deque<int> d(&bridge);
    for (int i = 0; i < elements; ++i) d.push_back(i);
  });

  // The per-request pattern: one arena, reset() between units of work. After the
  // first unit it has grown to the work's size and the upstream is not asked again.
  tracking_resource upstream(std::pmr::new_delete_resource());
  arena_resource arena(&upstream);
  std::printf("\nOne arena reused with reset() for 5 units of work (a vector of %d ints each):\n",
              elements);
  for (int unit = 1; unit <= 5; ++unit) {
    {
      std::pmr::vector<int> v(&arena);
      for (int i = 0; i < elements; ++i) v.push_back(i);
    }
    std::printf("  after unit %d: chunks taken from upstream so far %zu, bytes held %zu\n", unit,
                upstream.stats().total_allocations, upstream.stats().current_bytes);
    arena.reset();
  }
  arena.release();
  std::printf("  after release(): bytes held %zu, leaks: %s\n", upstream.stats().current_bytes,
              upstream.has_leaks() ? "yes" : "none");
}

// ---- 2. the shuffler ---------------------------------------------------------------

struct account {  // entries are trivially copyable: they move
  char owner[16];
  std::uint64_t balance;
};

unsigned long long raw(handle h) { return static_cast<unsigned long long>(h); }

void print_footprint(const char* when, const shuffler_stats& s, const tracking_stats& up) {
  std::printf("  %-26s %7zu %10zu %10zu %6.2f %6zu %10zu\n", when, s.live_entries, s.live_bytes,
              s.reserved_bytes, double(s.reserved_bytes) / double(std::max<std::size_t>(s.live_bytes, 1)),
              s.arenas, up.current_bytes);
}

void shuffler_basics() {
  heading("2. The shuffler: handles, leases, relocation, compaction");
  std::printf("(cipher none in this part, so the bytes are plain; part 3 turns encryption on)\n");
  tracking_resource upstream(std::pmr::new_delete_resource());
  // In place: a lease shows the entry where it lives, so its moves can be seen.
  shuffler s({.cipher = cipher_kind::none, .plaintext_in_place = true}, &upstream);

  handle alice = s.create<account>();
  handle bob = s.create<account>();
  {
    auto a = s.rent<account>(alice);
    std::strcpy(a->owner, "alice");
    a->balance = 100;
  }
  s.rent<account>(bob)->balance = 250;
  std::printf("Two entries: alice = handle %#llx, bob = handle %#llx (opaque: slot and generation).\n",
              raw(alice), raw(bob));

  std::printf("\nEach shuffle() moves every entry not rented to a fresh place:\n");
  for (int round = 0; round < 3; ++round) {
    {
      auto a = s.rent<account>(alice);
      std::printf("  alice lives at %p, balance %llu\n", static_cast<void*>(a.get()),
                  static_cast<unsigned long long>(a->balance));
    }
    s.shuffle();
  }

  std::printf("\nA lease pins its entry: shuffles leave it where it is until the lease ends.\n");
  {
    auto pinned = s.rent<account>(alice);
    void* before = pinned.get();
    s.shuffle();
    s.shuffle();
    std::printf("  rented at %p, after two shuffles still at %p\n", before,
                static_cast<void*>(pinned.get()));
  }

  s.free(bob);
  std::printf("\nbob freed: valid(bob) = %s at once; renting it anyway throws:\n",
              s.valid(bob) ? "true" : "false");
  try {
    (void)s.rent<account>(bob);
  } catch (const invalid_handle_error& e) {
    std::printf("  invalid_handle_error: %s\n", e.what());
  }
  struct too_big {
    char bytes[sizeof(account) * 2];
  };
  try {
    (void)s.rent<too_big>(alice);
  } catch (const type_error& e) {
    std::printf("  renting alice as a larger type: type_error: %s\n", e.what());
  }

  // Churn: many entries of mixed sizes, most of them freed again. The arenas stay
  // full of holes until a shuffle compacts the survivors and gives arenas back.
  std::mt19937 rng(7);
  std::vector<handle> entries;
  for (int i = 0; i < 5000; ++i)
    entries.push_back(s.alloc<std::byte>(16 + rng() % 4080));
  std::shuffle(entries.begin(), entries.end(), rng);
  for (std::size_t i = 0; i < entries.size() * 4 / 5; ++i) s.free(entries[i]);

  std::printf("\nFootprint after 5000 entries of 16 B..4 KiB were made and 4 in 5 freed again:\n");
  std::printf("  %-26s %7s %10s %10s %6s %6s %10s\n", "", "entries", "live B", "reserved B",
              "ratio", "arenas", "upstream B");
  print_footprint("before shuffle()", s.stats(), upstream.stats());
  s.shuffle();
  shuffler_stats after = s.stats();
  print_footprint("after shuffle()", after, upstream.stats());
  std::printf("  (%llu shuffles so far, %llu bytes moved in all, %llu arenas given back)\n",
              static_cast<unsigned long long>(after.shuffles),
              static_cast<unsigned long long>(after.bytes_moved),
              static_cast<unsigned long long>(after.arenas_released));
  std::printf("  alice after all that: %s, balance %llu\n", s.rent<account>(alice)->owner,
              static_cast<unsigned long long>(s.rent<account>(alice)->balance));
}

// ---- 3. encryption at rest -----------------------------------------------------------

// An upstream that keeps a list of the blocks it handed out, so the demo can look at
// the memory the shuffler keeps its entries in: what a memory dump would show.
class inspectable_resource : public std::pmr::memory_resource {
 public:
  bool contains(std::span<const std::byte> needle) const {
    for (auto [p, n] : blocks_) {
      auto* first = static_cast<const std::byte*>(p);
      if (std::search(first, first + n, needle.begin(), needle.end()) != first + n) return true;
    }
    return false;
  }

 private:
  void* do_allocate(std::size_t bytes, std::size_t align) override {
    void* p = std::pmr::new_delete_resource()->allocate(bytes, align);
    blocks_.emplace_back(p, bytes);
    return p;
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t align) override {
    std::erase_if(blocks_, [p](const auto& b) { return b.first == p; });
    std::pmr::new_delete_resource()->deallocate(p, bytes, align);
  }
  bool do_is_equal(const memory_resource& o) const noexcept override { return this == &o; }

  std::vector<std::pair<void*, std::size_t>> blocks_;
};

void print_bytes(const char* label, const void* p, std::size_t n) {
  std::printf("  %-22s", label);
  auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) std::printf("%02x%s", b[i], i % 4 == 3 ? " " : "");
  std::printf(" |");
  for (std::size_t i = 0; i < n; ++i) std::putchar(b[i] >= 32 && b[i] < 127 ? b[i] : '.');
  std::printf("|\n");
}

void encryption_at_rest() {
  heading("3. Encryption at rest (AES-256-CTR, then AES-256-GCM)");
  constexpr char secret[] = "correct horse battery";
  constexpr std::size_t n = sizeof(secret);
  const auto needle = std::as_bytes(std::span(secret, n - 1));

  inspectable_resource memory;
  // In place, to show the arena's bytes through a lease (by default a lease shows the
  // plaintext in a window of locked memory instead, never in the arena).
  std::printf("(decrypting in place here, to look at the arena; by default a lease shows a window)\n");
  shuffler s({.cipher = cipher_kind::aes_256_ctr, .plaintext_in_place = true}, &memory);
  handle h = s.alloc<char>(n);
  const char* where = nullptr;  // where the entry lives, as seen under a lease
  {
    auto l = s.rent<char>(h);
    std::memcpy(l.get(), secret, n);
    where = l.get();
    print_bytes("under a lease:", where, n);
  }
  print_bytes("at rest, same bytes:", where, n);
  std::printf("  the secret anywhere in the shuffler's memory at rest? %s\n",
              memory.contains(needle) ? "yes" : "no");
  {
    auto l = s.rent<char>(h);
    std::printf("  rented again: \"%s\" (found in memory now: %s)\n", l.get(),
                memory.contains(needle) ? "yes" : "no");
  }
  print_bytes("at rest after return:", where, n);
  std::printf("  (each return encrypts under a fresh counter: the ciphertext changes every time)\n");
  s.rotate_key();
  print_bytes("after rotate_key():", where, n);

  std::printf("\nWith AES-256-GCM a changed byte at rest is caught when the entry is rented:\n");
  shuffler g({.cipher = cipher_kind::aes_256_gcm, .plaintext_in_place = true}, &memory);
  handle gh = g.alloc<char>(n);
  char* at = nullptr;
  {
    auto l = g.rent<char>(gh);
    std::memcpy(l.get(), secret, n);
    at = l.get();
  }
  print_bytes("at rest:", at, n);
  at[0] = static_cast<char>(at[0] ^ 1);  // what an attacker with write access might do
  print_bytes("one bit flipped:", at, n);
  try {
    (void)g.rent<char>(gh);
  } catch (const integrity_error& e) {
    std::printf("  rent: integrity_error: %s\n", e.what());
  }
}

}  // namespace

int main() {
  std::printf("memshuffle demo\n");
  pmr_containers();
  shuffler_basics();
  encryption_at_rest();
}
