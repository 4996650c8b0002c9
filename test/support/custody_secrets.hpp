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
  }
  bool entry_holds(shuffler& s, handle h, std::uint32_t number) const {
    auto l = s.rent<std::byte>(h);
    for (std::size_t at = 0; at + 16 <= l.size(); at += 16)
      if (std::memcmp(l.get() + at, marker().data(), marker_size) != 0 ||
          std::memcmp(l.get() + at + marker_size, &number, 4) != 0)
        return false;
    return true;
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
