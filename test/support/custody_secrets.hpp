#pragma once
// What a custody test knows and the scan must not find elsewhere: two keys and salts,
// their GCM hash keys H = AES_K(0^128), and a marker that every 16-byte block of every
// entry's plaintext starts with. All of it is made at run time from the test's seed and
// lives only in a MADV_DONTDUMP mapping the scan skips; shufflers are made from options
// built there too, so the test itself leaves no copy in scanned memory.
#include <cryptopp/aes.h>

#include <memshuffle/secure_wipe.hpp>
#include <memshuffle/shuffler.hpp>
#include <test/support/memory_scan.hpp>

#include <cstdint>
#include <cstring>
#include <memory>
#include <memory_resource>
#include <new>
#include <span>
#include <string>

namespace memshuffle::testing {

// Zeroes the vector registers. The test calls it after it touched plaintext itself, so
// that the dynamic linker, which saves every vector register on the stack when it binds
// a symbol lazily, cannot leave the test's own copies there for the scan to count. What
// the library leaves in them is the library's.
inline void clear_vector_registers() noexcept {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx")) {
    asm volatile("vzeroall" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
                 "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
  } else {
    asm volatile(
        "pxor %%xmm0, %%xmm0\n pxor %%xmm1, %%xmm1\n pxor %%xmm2, %%xmm2\n pxor %%xmm3, %%xmm3\n"
        "pxor %%xmm4, %%xmm4\n pxor %%xmm5, %%xmm5\n pxor %%xmm6, %%xmm6\n pxor %%xmm7, %%xmm7\n"
        "pxor %%xmm8, %%xmm8\n pxor %%xmm9, %%xmm9\n pxor %%xmm10, %%xmm10\n pxor %%xmm11, %%xmm11\n"
        "pxor %%xmm12, %%xmm12\n pxor %%xmm13, %%xmm13\n pxor %%xmm14, %%xmm14\n pxor %%xmm15, %%xmm15" ::
            : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
              "xmm12", "xmm13", "xmm14", "xmm15");
  }
  // glibc's string functions use the upper 16 registers where AVX-512 is there.
  if (__builtin_cpu_supports("avx512f"))
    asm volatile(
        "vpxord %%zmm16, %%zmm16, %%zmm16\n vpxord %%zmm17, %%zmm17, %%zmm17\n vpxord %%zmm18, %%zmm18, %%zmm18\n"
        "vpxord %%zmm19, %%zmm19, %%zmm19\n vpxord %%zmm20, %%zmm20, %%zmm20\n vpxord %%zmm21, %%zmm21, %%zmm21\n"
        "vpxord %%zmm22, %%zmm22, %%zmm22\n vpxord %%zmm23, %%zmm23, %%zmm23\n vpxord %%zmm24, %%zmm24, %%zmm24\n"
        "vpxord %%zmm25, %%zmm25, %%zmm25\n vpxord %%zmm26, %%zmm26, %%zmm26\n vpxord %%zmm27, %%zmm27, %%zmm27\n"
        "vpxord %%zmm28, %%zmm28, %%zmm28\n vpxord %%zmm29, %%zmm29, %%zmm29\n vpxord %%zmm30, %%zmm30, %%zmm30\n"
        "vpxord %%zmm31, %%zmm31, %%zmm31" ::: "memory");
#endif
}

class custody_secrets {
 public:
  static constexpr std::size_t marker_size = 12;  // then a 4-byte entry number

  explicit custody_secrets(std::uint64_t seed) : mem_(8192) {
    fill_from_seed(mem_.span().first(used), seed);
    for (int i : {0, 1}) compute_hash_key(i);
  }

  const key_type& key(int i) const { return *reinterpret_cast<const key_type*>(mem_.data() + 32 * i); }
  const salt_type& salt(int i) const { return *reinterpret_cast<const salt_type*>(mem_.data() + 64 + 8 * i); }
  std::span<const std::byte> hash_key(int i) const { return {mem_.data() + 80 + 16 * i, 16}; }
  std::span<const std::byte> marker() const { return {mem_.data() + 112, marker_size}; }

  // Adds every item to the scan: the marker, both keys, salts and hash keys, schedules.
  void add_to(memory_scan& scan) const {
    scan.add("plaintext marker", marker());
    for (int i : {0, 1}) {
      const std::string n = std::to_string(i + 1);
      scan.add("raw key " + n, std::as_bytes(std::span(key(i))));
      scan.add("salt " + n, std::as_bytes(std::span(salt(i))));
      scan.add("GCM hash key H " + n, hash_key(i));
    }
    scan.find_schedules();
  }

  // A shuffler under key and salt 1, otherwise with default options (and the given
  // plaintext resource, when not null).
  std::unique_ptr<shuffler> make(cipher_kind c, std::pmr::memory_resource* upstream,
                                 std::pmr::memory_resource* plaintext = nullptr) const {
    auto* opt = ::new (mem_.data() + options_at) shuffler_options{};
    opt->cipher = c;
    if (plaintext != nullptr) opt->plaintext_resource = plaintext;
    opt->key.emplace();
    opt->salt.emplace();
    std::memcpy(opt->key->data(), key(0).data(), 32);
    std::memcpy(opt->salt->data(), salt(0).data(), 8);
    auto s = std::make_unique<shuffler>(*opt, upstream);
    opt->~shuffler_options();
    secure_wipe(mem_.data() + options_at, sizeof(shuffler_options));
    return s;
  }

  // Every 16-byte block of the entry: the marker, then the entry's number. Copied
  // straight from the hidden mapping into the lease.
  void write_entry(shuffler& s, handle h, std::uint32_t number) const {
    auto l = s.rent<std::byte>(h);
    fill_blocks(l.get(), l.size(), number);
  }
  void fill_blocks(std::byte* p, std::size_t n, std::uint32_t number) const {
    for (std::size_t at = 0; at + 16 <= n; at += 16) {
      std::memcpy(p + at, marker().data(), marker_size);
      std::memcpy(p + at + marker_size, &number, 4);
    }
    clear_vector_registers();
  }
  bool entry_holds(shuffler& s, handle h, std::uint32_t number) const {
    auto l = s.rent<std::byte>(h);
    bool same = true;
    for (std::size_t at = 0; same && at + 16 <= l.size(); at += 16)
      same = std::memcmp(l.get() + at, marker().data(), marker_size) == 0 &&
             std::memcmp(l.get() + at + marker_size, &number, 4) == 0;
    clear_vector_registers();
    return same;
  }

 private:
  static constexpr std::size_t used = 128, zeros_at = 256, aes_at = 512, options_at = 4096;

  // H = AES_K(0^128), with the AES object in the hidden mapping (its schedule's SecBlock,
  // on the heap, is wiped when it ends).
  void compute_hash_key(int i) {
    auto* aes = ::new (mem_.data() + aes_at)
        CryptoPP::AES::Encryption(reinterpret_cast<const CryptoPP::byte*>(key(i).data()), 32);
    aes->ProcessBlock(reinterpret_cast<const CryptoPP::byte*>(mem_.data() + zeros_at),
                      reinterpret_cast<CryptoPP::byte*>(mem_.data() + 80 + 16 * i));
    std::destroy_at(aes);
  }

  hidden_bytes mem_;
};

}  // namespace memshuffle::testing
