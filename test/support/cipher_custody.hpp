#pragma once
// What the cipher's custody tests look for and where: 16-byte blocks of key material,
// keystream and plaintext, held on the stack (never in the heap that one of them
// scans), the vector registers' contents, the main heap, the stack below the caller,
// and a secret resource a test can make inaccessible.
#include <doctest/doctest.h>

#include <memshuffle/secure_wipe.hpp>

#include <crypto++/aes.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <fstream>
#include <memory_resource>
#include <new>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "test/support/vector_register_file.hpp"

namespace memshuffle::testing {

using block = std::array<std::byte, 16>;

struct secret_blocks {
  std::array<block, 96> b{};
  std::size_t n = 0;
  void add(const block& x) {
    if (n < b.size()) b[n++] = x;
  }
  void add_data(std::span<const std::byte> data) {
    for (std::size_t i = 0; i + 16 <= data.size(); i += 16) {
      block x;
      std::copy_n(data.begin() + static_cast<long>(i), 16, x.begin());
      add(x);
    }
  }
};

// Crypto++'s expanded key (in the byte order it keeps, and with each 32-bit word
// reversed, which covers both of its layouts) and AES_K of chosen blocks. The object
// is gone, its buffers wiped by Crypto++, before any caller scans memory.
class aes_probe : public CryptoPP::AES::Encryption {
 public:
  explicit aes_probe(std::span<const std::byte> key) {
    SetKey(reinterpret_cast<const CryptoPP::byte*>(key.data()), key.size());
  }
  void add_round_keys(secret_blocks& s) const {
    const auto* p = reinterpret_cast<const std::byte*>(m_key.data());
    for (std::size_t r = 0; r + 16 <= m_key.SizeInBytes(); r += 16) {
      block as_kept, swapped;
      std::copy_n(p + r, 16, as_kept.begin());
      for (std::size_t i = 0; i < 16; ++i) swapped[i] = as_kept[(i & ~std::size_t{3}) + 3 - (i & 3)];
      s.add(as_kept);
      s.add(swapped);
    }
  }
  block encrypt(const block& in) const {
    block out;
    ProcessBlock(reinterpret_cast<const CryptoPP::byte*>(in.data()), reinterpret_cast<CryptoPP::byte*>(out.data()));
    return out;
  }
};

// The counter block plus n, 128-bit big-endian (CTR), or in its last 32 bits (GCM).
inline block counter_plus(block c, std::size_t n, std::size_t width) {
  for (std::size_t i = 16; i-- > 16 - width && n != 0;) {
    const std::size_t sum = static_cast<std::size_t>(c[i]) + (n & 0xFF);
    c[i] = static_cast<std::byte>(sum);
    n = (n >> 8) + (sum >> 8);
  }
  return c;
}

// Round keys, the keystream blocks of `blocks` blocks from `first`, and for GCM the
// hash key H = AES_K(0).
inline secret_blocks key_material(std::span<const std::byte> key, const block& first, std::size_t blocks,
                           std::size_t counter_width, bool gcm) {
  secret_blocks s;
  const aes_probe aes(key);
  aes.add_round_keys(s);
  for (std::size_t i = 0; i < blocks; ++i) s.add(aes.encrypt(counter_plus(first, i, counter_width)));
  if (gcm) s.add(aes.encrypt(block{}));
  return s;
}

inline std::size_t hits_in(const vector_register_file& f, const secret_blocks& s) {
  std::size_t hits = 0;
  for (std::size_t r = 0; r < f.count; ++r)
    for (std::size_t i = 0; i < s.n; ++i) hits += f.reg[r] == s.b[i];
  return hits;
}

inline constexpr std::array<std::byte, 32> fixed_key = [] {
  std::array<std::byte, 32> k{};
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<std::byte>(0xA5 ^ (i * 29));
  return k;
}();

// Counts where any of the blocks occurs in [begin, end), at every 4-byte offset.
// Reads memory the address sanitizer may have poisoned, hence unchecked.
inline __attribute__((no_sanitize_address, no_sanitize_thread)) std::size_t
occurrences(const std::byte* begin, const std::byte* end, const secret_blocks& s) {
  std::size_t hits = 0;
  for (const std::byte* p = begin; p + 16 <= end; p += 4)
    for (std::size_t i = 0; i < s.n; ++i) {
      const std::byte* q = s.b[i].data();
      bool same = true;
      for (std::size_t j = 0; j < 16 && same; ++j) same = p[j] == q[j];
      hits += same;
    }
  return hits;
}

// glibc's main heap (where the main thread's malloc draws from).
inline std::pair<const std::byte*, const std::byte*> heap_mapping() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.ends_with("[heap]")) {
      const auto dash = line.find('-');
      const auto begin = std::stoull(line.substr(0, dash), nullptr, 16);
      const auto end = std::stoull(line.substr(dash + 1), nullptr, 16);
      return {reinterpret_cast<const std::byte*>(begin), reinterpret_cast<const std::byte*>(end)};
    }
  return {nullptr, nullptr};
}

inline std::size_t heap_occurrences(const secret_blocks& s) {
  const auto [begin, end] = heap_mapping();
  return begin == nullptr ? 0 : occurrences(begin, end, s);
}

// A secret resource of whole pages that a test can make inaccessible: in a fork child
// that is what memfd_secret memory is (not mapped at all).
class page_resource : public std::pmr::memory_resource {
 public:
  std::vector<std::pair<void*, std::size_t>> pages;
  std::size_t deallocations = 0;
  void make_inaccessible() {
    for (auto [p, n] : pages) ::mprotect(p, n, PROT_NONE);
  }

 private:
  static std::size_t rounded(std::size_t n) { return (n + 4095) / 4096 * 4096; }
  void* do_allocate(std::size_t n, std::size_t) override {
    void* p = ::mmap(nullptr, rounded(n), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    pages.emplace_back(p, rounded(n));
    return p;
  }
  void do_deallocate(void* p, std::size_t n, std::size_t) override {
    ++deallocations;  // without touching the bytes: munmap only
    ::munmap(p, rounded(n));
  }
  bool do_is_equal(const std::pmr::memory_resource& o) const noexcept override { return this == &o; }
};


// The stack below the caller's frame, where the frames of the calls it just made lay.
inline __attribute__((noinline, no_sanitize_address, no_sanitize_thread)) std::size_t
stack_occurrences(const secret_blocks& s) {
  const auto* top = static_cast<const std::byte*>(__builtin_frame_address(0));
  return occurrences(top - 65536, top - 128, s);
}

// Zeroes the stack below the caller's frame, so a later scan sees only what came after.
inline __attribute__((noinline)) void scrub_stack() {
  std::byte below[65536 + 1024];
  memshuffle::secure_wipe(below, sizeof below);
}

// Runs one test case of this program in a new process (exec, not fork: nothing bound
// or warmed up by the tests before it), with MEMSHUFFLE_FRESH_PROCESS set there.
inline int run_in_fresh_process(const char* test_case) {
  std::string filter = std::string("--test-case=") + test_case;
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, filter.data(), const_cast<char*>("--no-intro"), const_cast<char*>("--no-version"), nullptr};
  std::vector<char*> env;
  for (char** e = environ; *e != nullptr; ++e) env.push_back(*e);
  std::string mark = "MEMSHUFFLE_FRESH_PROCESS=1";
  env.push_back(mark.data());
  env.push_back(nullptr);
  pid_t pid = 0;
  if (::posix_spawn(&pid, exe, nullptr, nullptr, argv, env.data()) != 0) return -1;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
  }
  return status;
}

}  // namespace memshuffle::testing
