// The cipher seam against the published vectors, and the properties the shuffler
// relies on: in-place sealing, 128-bit counter carry, tamper detection that leaves
// data unchanged, and thread-safe const calls.
#include <doctest/doctest.h>

#include <memshuffle/cipher.hpp>
#include <memshuffle/detail/sanitizers.hpp>
#include <memshuffle/error.hpp>
#include <memshuffle/secure_wipe.hpp>

#include "test/support/child_process.hpp"
#include "test/support/cipher_kinds.hpp"
#include "test/support/cipher_custody.hpp"
#include "test/support/random_bytes.hpp"
#include "test/support/recording_resource.hpp"
#include "test/support/seed.hpp"

#include <crypto++/aes.h>
#include <crypto++/modes.h>


#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

using memshuffle::cipher;
using memshuffle::cipher_kind;
using bytes = std::vector<std::byte>;
using memshuffle::testing::all_ciphers;
using memshuffle::testing::block;
using memshuffle::testing::encrypting_ciphers;
using memshuffle::testing::fixed_key;
using memshuffle::testing::heap_occurrences;
using memshuffle::testing::hits_in;
using memshuffle::testing::key_material;
using memshuffle::testing::page_resource;
using memshuffle::testing::random_bytes;
using memshuffle::testing::run_in_fresh_process;
using memshuffle::testing::scrub_stack;
using memshuffle::testing::secret_blocks;
using memshuffle::testing::stack_occurrences;

namespace {

bytes hex(std::string_view s) {
  auto nibble = [](char c) {
    return static_cast<unsigned>(c <= '9' ? c - '0' : c - 'a' + 10);
  };
  bytes out;
  for (std::size_t i = 0; i + 1 < s.size(); i += 2)
    out.push_back(static_cast<std::byte>(nibble(s[i]) << 4 | nibble(s[i + 1])));
  return out;
}

// The reference the counter tests compare against: Crypto++'s own CTR mode.
bytes cryptopp_ctr(const bytes& key, const bytes& iv, bytes data) {
  CryptoPP::CTR_Mode<CryptoPP::AES>::Encryption e;
  e.SetKeyWithIV(reinterpret_cast<const CryptoPP::byte*>(key.data()), key.size(),
                 reinterpret_cast<const CryptoPP::byte*>(iv.data()), iv.size());
  auto* p = reinterpret_cast<CryptoPP::byte*>(data.data());
  e.ProcessData(p, p, data.size());
  return data;
}

const bytes nist_key = hex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
const bytes nist_counter = hex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff");
const bytes nist_plaintext = hex(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710");
const bytes nist_ciphertext = hex(
    "601ec313775789a5b7a7f504bbf3d228"
    "f443e3ca4d62b59aca84e990cacaf5c5"
    "2b0930daa23de94ce87017ba2d84988d"
    "dfc9c58db67aada613c2dd08457941a6");

// McGrew and Viega, "The Galois/Counter Mode of Operation", appendix B.
struct gcm_vector {
  int test_case;
  std::string_view key, iv, aad, plaintext, ciphertext, tag;
};

constexpr std::string_view spec_key =
    "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
constexpr std::string_view spec_aad = "feedfacedeadbeeffeedfacedeadbeefabaddad2";
constexpr std::string_view spec_plaintext_60 =
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";

const gcm_vector gcm_vectors[] = {
    {13, "0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"},
    {14, "0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "", "00000000000000000000000000000000",
     "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"},
    {15, spec_key, "cafebabefacedbaddecaf888", "",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
     "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
     "b094dac5d93471bdec1a502270e3cc6c"},
    {16, spec_key, "cafebabefacedbaddecaf888", spec_aad, spec_plaintext_60,
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"},
    {17, spec_key, "cafebabefacedbad", spec_aad, spec_plaintext_60,
     "c3762df1ca787d32ae47c13bf19844cbaf1ae14d0b976afac52ff7d79bba9de0"
     "feb582d33934a4f0954cc2363bc73f7862ac430e64abe499f47c9b1f",
     "3a337dbf46a792c45e454913fe2ea8f2"},
    {18, spec_key,
     "9313225df88406e555909c5aff5269aa6a7a9538534f7da1e4c303d2a318a728"
     "c3c0c95156809539fcf0e2429a6b525416aedbf5a0de6a57a637b39b",
     spec_aad, spec_plaintext_60,
     "5a8def2f0c9e53f1f75d7853659e2a20eeb2b22aafde6419a058ab4f6f746bf4"
     "0fc0c3b780f244452da3ebf1c5d82cdea2418997200ef82e44ae7e3f",
     "a44a8266ee1c8eb0c8b5d4cf5ae9f19a"},
};

// A sealed GCM message whose parts the tamper tests alter one at a time.
struct gcm_message {
  bytes iv = hex("cafebabefacedbaddecaf888");
  bytes aad = hex(spec_aad);
  bytes data = hex(spec_plaintext_60);
  bytes tag = bytes(cipher::gcm_tag_size);
};

}  // namespace


TEST_SUITE("crypto") {

TEST_CASE("AES-256-CTR seals the NIST SP 800-38A F.5.5 vector from its full counter block") {
  const cipher c(cipher_kind::aes_256_ctr, nist_key);
  bytes data = nist_plaintext;
  c.seal(nist_counter, {}, data, {});
  CHECK(data == nist_ciphertext);
}

TEST_CASE("AES-256-CTR opens the NIST SP 800-38A F.5.6 vector from its full counter block") {
  const cipher c(cipher_kind::aes_256_ctr, nist_key);
  bytes data = nist_ciphertext;
  c.open(nist_counter, {}, data, {});
  CHECK(data == nist_plaintext);
}

TEST_CASE("AES-256-CTR seals any prefix of the NIST plaintext to the same prefix of the ciphertext") {
  const cipher c(cipher_kind::aes_256_ctr, nist_key);
  for (std::size_t n = 0; n <= nist_plaintext.size(); ++n) {
    CAPTURE(n);
    bytes data(nist_plaintext.begin(), nist_plaintext.begin() + static_cast<long>(n));
    c.seal(nist_counter, {}, data, {});
    CHECK(std::equal(data.begin(), data.end(), nist_ciphertext.begin()));
  }
}

TEST_CASE("AES-256-GCM seals and opens the specification's test cases 13 to 18") {
  for (const auto& v : gcm_vectors) {
    CAPTURE(v.test_case);
    const cipher c(cipher_kind::aes_256_gcm, hex(v.key));
    const bytes iv = hex(v.iv), aad = hex(v.aad), plaintext = hex(v.plaintext);
    bytes data = plaintext, tag(cipher::gcm_tag_size);
    c.seal(iv, aad, data, tag);
    CHECK(data == hex(v.ciphertext));
    CHECK(tag == hex(v.tag));
    c.open(iv, aad, data, tag);
    CHECK(data == plaintext);
  }
}

TEST_CASE("a GCM open of an altered byte, tag, associated data or nonce throws and changes nothing") {
  const cipher c(cipher_kind::aes_256_gcm, hex(spec_key));
  gcm_message sealed;
  c.seal(sealed.iv, sealed.aad, sealed.data, sealed.tag);

  auto expect_rejected = [&](const gcm_message& m) {
    bytes data = m.data;
    CHECK_THROWS_AS(c.open(m.iv, m.aad, data, m.tag), memshuffle::integrity_error);
    CHECK(data == m.data);
  };
  for (std::size_t i = 0; i < sealed.data.size(); ++i) {
    CAPTURE(i);
    gcm_message m = sealed;
    m.data[i] ^= std::byte{0x01};
    expect_rejected(m);
  }
  for (std::size_t i = 0; i < sealed.tag.size(); ++i) {
    CAPTURE(i);
    gcm_message m = sealed;
    m.tag[i] ^= std::byte{0x80};
    expect_rejected(m);
  }
  gcm_message other_aad = sealed;
  other_aad.aad.back() ^= std::byte{0x01};
  expect_rejected(other_aad);
  gcm_message no_aad = sealed;
  no_aad.aad.clear();
  expect_rejected(no_aad);
  gcm_message other_iv = sealed;
  other_iv.iv[0] ^= std::byte{0x01};
  expect_rejected(other_iv);

  // The cipher is still usable after rejections.
  bytes data = sealed.data;
  c.open(sealed.iv, sealed.aad, data, sealed.tag);
  CHECK(data == hex(spec_plaintext_60));
}

TEST_CASE("sealing and opening from one range into another gives what in place gives, and leaves the input alone") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  for (auto kind : all_ciphers) {
    CAPTURE(static_cast<int>(kind));
    const cipher c(kind, random_bytes(rng, 32));
    const bool gcm = kind == cipher_kind::aes_256_gcm;
    for (std::size_t n : {0, 1, 15, 16, 17, 64, 100, 4103}) {
      CAPTURE(n);
      const bytes iv = random_bytes(rng, gcm ? 12 : 16), aad = gcm ? random_bytes(rng, 5) : bytes{};
      const bytes plaintext = random_bytes(rng, n);
      bytes in_place = plaintext, tag_in_place(c.tag_size()), sealed(n), tag(c.tag_size());
      c.seal(iv, aad, in_place, tag_in_place);
      c.seal(iv, aad, plaintext, sealed, tag);
      CHECK(sealed == in_place);
      CHECK(tag == tag_in_place);
      bytes opened(n);
      c.open(iv, aad, sealed, opened, tag);
      CHECK(opened == plaintext);
      CHECK(sealed == in_place);  // the input is read only
    }
  }
}

TEST_CASE("a GCM open into another range that fails its tag leaves zeros there and the input as it was") {
  const cipher c(cipher_kind::aes_256_gcm, hex(spec_key));
  gcm_message m;
  c.seal(m.iv, m.aad, m.data, m.tag);
  const bytes sealed = m.data;
  m.tag[0] ^= std::byte{1};
  bytes out(sealed.size(), std::byte{0x55});
  CHECK_THROWS_AS(c.open(m.iv, m.aad, sealed, out, m.tag), memshuffle::integrity_error);
  CHECK(out == bytes(sealed.size()));  // no unverified plaintext shown
  CHECK(sealed == m.data);
}

TEST_CASE("reseal re-encrypts under the new key through a scratch smaller than the message, and wipes it") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  for (auto kind : encrypting_ciphers) {
    CAPTURE(static_cast<int>(kind));
    const bool gcm = kind == cipher_kind::aes_256_gcm;
    const cipher from(kind, random_bytes(rng, 32)), to(kind, random_bytes(rng, 32));
    for (std::size_t n : {0, 5, 64, 1000, 4099}) {
      for (std::size_t scratch_size : {16, 100, 4096, 8192}) {
        CAPTURE(n);
        CAPTURE(scratch_size);
        const bytes from_iv = random_bytes(rng, gcm ? 12 : 16), to_iv = random_bytes(rng, gcm ? 12 : 16);
        const bytes aad = gcm ? random_bytes(rng, 8) : bytes{}, plaintext = random_bytes(rng, n);
        bytes data = plaintext, tag(from.tag_size());
        from.seal(from_iv, aad, data, tag);
        bytes expected = plaintext, expected_tag(to.tag_size());
        to.seal(to_iv, aad, expected, expected_tag);
        bytes scratch(scratch_size, std::byte{0x5A});
        to.reseal(from, from_iv, to_iv, aad, data, tag, scratch);
        CHECK(data == expected);
        CHECK(tag == expected_tag);
        // The part that held plaintext is wiped; the rest was never touched.
        const std::size_t used = n <= scratch_size ? n : scratch_size / 16 * 16;
        bytes after(scratch_size, std::byte{0x5A});
        std::fill_n(after.begin(), used, std::byte{0});
        CHECK(scratch == after);
      }
    }
  }
}

TEST_CASE("a reseal whose old GCM tag does not match throws and leaves data, tag and scratch alone") {
  const cipher from(cipher_kind::aes_256_gcm, hex(spec_key)), to(cipher_kind::aes_256_gcm, bytes(32, std::byte{3}));
  for (std::size_t scratch_size : {32, 4096}) {  // piece by piece, and whole
    CAPTURE(scratch_size);
    gcm_message m;
    from.seal(m.iv, m.aad, m.data, m.tag);
    m.tag[3] ^= std::byte{1};
    const gcm_message altered = m;
    bytes scratch(scratch_size);
    CHECK_THROWS_AS(to.reseal(from, m.iv, m.iv, m.aad, m.data, m.tag, scratch), memshuffle::integrity_error);
    CHECK(m.data == altered.data);
    CHECK(m.tag == altered.tag);
    CHECK(scratch == bytes(scratch_size));
  }
  const cipher ctr(cipher_kind::aes_256_ctr, bytes(32));
  bytes data(64), scratch(8), no_tag;
  CHECK_THROWS_AS(ctr.reseal(from, bytes(16), bytes(16), {}, data, no_tag, scratch), std::invalid_argument);
  CHECK_THROWS_AS(ctr.reseal(ctr, bytes(16), bytes(16), {}, data, no_tag, scratch), std::invalid_argument);
  CHECK(data == bytes(64));
}

TEST_CASE("a key that is not 32 bytes is rejected for every cipher kind") {
  for (auto kind : all_ciphers) {
    CAPTURE(static_cast<int>(kind));
    for (std::size_t n : {0, 16, 24, 31, 33}) {
      CAPTURE(n);
      const bytes key(n);
      CHECK_THROWS_AS(cipher(kind, key), std::invalid_argument);
    }
  }
}

TEST_CASE("arguments that do not fit the cipher are rejected and the data is left alone") {
  const bytes key(32, std::byte{7});
  const bytes original = hex(spec_plaintext_60);
  bytes data = original, tag16(16), tag12(12), aad(4), iv16(16), iv12(12);

  const cipher ctr(cipher_kind::aes_256_ctr, key);
  CHECK_THROWS_AS(ctr.seal(iv12, {}, data, {}), std::invalid_argument);
  CHECK_THROWS_AS(ctr.seal(iv16, aad, data, {}), std::invalid_argument);
  CHECK_THROWS_AS(ctr.seal(iv16, {}, data, tag16), std::invalid_argument);
  CHECK_THROWS_AS(ctr.open(iv12, {}, data, {}), std::invalid_argument);

  const cipher gcm(cipher_kind::aes_256_gcm, key);
  CHECK_THROWS_AS(gcm.seal({}, {}, data, tag16), std::invalid_argument);
  CHECK_THROWS_AS(gcm.seal(iv12, {}, data, tag12), std::invalid_argument);
  CHECK_THROWS_AS(gcm.open(iv12, {}, data, {}), std::invalid_argument);

  const cipher none(cipher_kind::none, key);
  CHECK_THROWS_AS(none.seal(iv16, {}, data, tag16), std::invalid_argument);
  CHECK(data == original);

  // From one range into another: the sizes must agree, and the output is left alone.
  bytes shorter(original.size() - 1, std::byte{9});
  CHECK_THROWS_AS(ctr.seal(iv16, {}, original, shorter, {}), std::invalid_argument);
  CHECK_THROWS_AS(gcm.open(iv12, {}, original, shorter, tag16), std::invalid_argument);
  CHECK_THROWS_AS(none.seal(iv16, {}, original, shorter, {}), std::invalid_argument);
  CHECK(shorter == bytes(original.size() - 1, std::byte{9}));
}

TEST_CASE("the none cipher leaves data as it is and writes no tag") {
  const cipher c(cipher_kind::none, bytes(32));
  CHECK(c.tag_size() == 0);
  const bytes original = hex(spec_plaintext_60);
  bytes data = original;
  c.seal(bytes(16), {}, data, {});
  CHECK(data == original);
  c.open(bytes(16), {}, data, {});
  CHECK(data == original);
}

TEST_CASE("the CTR counter block is one 128-bit big-endian number that carries across every byte") {
  // Carrying into the upper 64 bits matters: an increment confined to the low 64 bits
  // would repeat keystream when the low half wraps. At 2^128 - 1 the counter wraps to 0.
  const bytes key = hex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
  const cipher c(cipher_kind::aes_256_ctr, key);
  const char* starts[] = {
      "00000000000000000000000000000000", "000000000000000000000000000000fe",
      "0000000000000000fffffffffffffffe", "0000000000000000ffffffffffffff00",
      "00000000ffffffffffffffffffffffff", "fffffffffffffffffffffffffffffffd",
      "f0f1f2f3f4f5f6f7f8f9fafbfcfdfe80",
  };
  for (const char* start : starts) {
    CAPTURE(start);
    const bytes iv = hex(start);
    for (std::size_t n : {16, 17, 48, 64, 100, 4096, 4100}) {
      CAPTURE(n);
      bytes zeros(n);
      c.seal(iv, {}, zeros, {});
      CHECK(zeros == cryptopp_ctr(key, iv, bytes(n)));
    }
  }

  // The block after ...00ff ffff ffff ffff ffff uses ...0100 0000 0000 0000 0000, and
  // the block after all ones uses all zeros: keystream blocks are AES(counter).
  auto keystream_at = [&](const char* counter) {
    bytes block(16);
    c.seal(hex(counter), {}, block, {});
    return block;
  };
  bytes two(32);
  c.seal(hex("0000000000000000ffffffffffffffff"), {}, two, {});
  CHECK(bytes(two.begin() + 16, two.end()) == keystream_at("00000000000000010000000000000000"));
  two.assign(32, std::byte{0});
  c.seal(hex("ffffffffffffffffffffffffffffffff"), {}, two, {});
  CHECK(bytes(two.begin() + 16, two.end()) == keystream_at("00000000000000000000000000000000"));
}

TEST_CASE("AES-256-CTR agrees with Crypto++'s CTR mode on random keys, counters and lengths") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 200; ++round) {
    const bytes key = random_bytes(rng, 32), iv = random_bytes(rng, 16);
    const bytes plaintext = random_bytes(rng, rng() % 9000);
    const cipher c(cipher_kind::aes_256_ctr, key);
    bytes data = plaintext;
    c.seal(iv, {}, data, {});
    REQUIRE(data == cryptopp_ctr(key, iv, plaintext));
    c.open(iv, {}, data, {});
    REQUIRE(data == plaintext);
  }
}

TEST_CASE("a moved-from cipher refuses to work instead of crashing") {
  cipher a(cipher_kind::aes_256_ctr, bytes(32));
  cipher b = std::move(a);
  bytes data(16);
  CHECK_THROWS_AS(a.seal(bytes(16), {}, data, {}), std::logic_error);  // NOLINT(bugprone-use-after-move)
  CHECK_NOTHROW(b.seal(bytes(16), {}, data, {}));
  CHECK(b.kind() == cipher_kind::aes_256_ctr);
}


TEST_CASE("after a seal or open the vector registers hold no round key, hash key, keystream or plaintext") {
  if (!memshuffle::testing::vector_registers_readable) return;
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  for (auto kind : encrypting_ciphers) {
    CAPTURE(static_cast<int>(kind));
    const bool gcm = kind == cipher_kind::aes_256_gcm;
    const cipher c(kind, fixed_key);
    // CTR: a counter that carries across a byte within the data. GCM: a random nonce,
    // whose first counter block is nonce || 0x00000001.
    const bytes iv = gcm ? random_bytes(rng, cipher::gcm_nonce_size) : hex("000000000000000000000000000000fc");
    block first{};
    std::copy(iv.begin(), iv.end(), first.begin());
    if (gcm) first[15] = std::byte{1};
    for (std::size_t n : {16, 100, 4096 + 7}) {
      CAPTURE(n);
      const bytes plaintext = random_bytes(rng, n);
      secret_blocks secret = key_material(fixed_key, first, n / 16 + 2, gcm ? 4 : 16, gcm);
      secret.add_data(plaintext);
      memshuffle::testing::vector_register_file after_seal, after_open;
      bytes data = plaintext, tag(c.tag_size());
      c.seal(iv, {}, data, tag);
      MEMSHUFFLE_READ_VECTOR_REGISTERS(after_seal);
      c.open(iv, {}, data, tag);
      MEMSHUFFLE_READ_VECTOR_REGISTERS(after_open);
      REQUIRE(data == plaintext);
      CHECK(hits_in(after_seal, secret) == 0);
      CHECK(hits_in(after_open, secret) == 0);
    }
  }
}

TEST_CASE("between calls the heap holds no key, round key, hash key or keystream of a cipher") {
  // The sanitizers' allocators do not use glibc's [heap].
  if (memshuffle::detail::address_sanitizer || memshuffle::detail::thread_sanitizer) return;
  const block counter{};
  // Key material of 300 bytes of data for CTR (counter 0) and GCM (a zero nonce).
  block j0{};
  j0[15] = std::byte{1};
  secret_blocks secret = key_material(fixed_key, counter, 20, 16, false);
  const secret_blocks gcm_secret = key_material(fixed_key, j0, 20, 4, true);
  for (std::size_t i = 30; i < gcm_secret.n; ++i) secret.add(gcm_secret.b[i]);  // keystream, H
  {
    // The scan finds what is there: a round key copied into the heap.
    auto planted = std::make_unique<block>(secret.b[4]);
    REQUIRE(heap_occurrences(secret) >= 1);
    memshuffle::secure_wipe(planted.get(), sizeof(block));
  }
  REQUIRE(heap_occurrences(secret) == 0);

  const cipher ctr(cipher_kind::aes_256_ctr, fixed_key);
  const cipher gcm(cipher_kind::aes_256_gcm, fixed_key);
  bytes data(300, std::byte{0x5A}), tag(cipher::gcm_tag_size);
  ctr.seal(counter, {}, data, {});
  ctr.open(counter, {}, data, {});
  gcm.seal(bytes(cipher::gcm_nonce_size), {}, data, tag);
  gcm.open(bytes(cipher::gcm_nonce_size), {}, data, tag);
  REQUIRE(data == bytes(300, std::byte{0x5A}));
  CHECK(heap_occurrences(secret) == 0);
}

TEST_CASE("a cipher used in a child made by fork() throws fork_error and leaves the data alone") {
  for (auto kind : encrypting_ciphers) {
    CAPTURE(static_cast<int>(kind));
    const cipher c(kind, fixed_key);
    const bytes iv(kind == cipher_kind::aes_256_ctr ? 16 : 12), original(100, std::byte{3});
    const int status = memshuffle::testing::run_in_child([&] {
      bytes data = original, tag(c.tag_size());
      int refused = 0;
      try {
        c.seal(iv, {}, data, tag);
      } catch (const memshuffle::fork_error&) {
        ++refused;
      }
      try {
        c.open(iv, {}, data, tag);
      } catch (const memshuffle::fork_error&) {
        ++refused;
      }
      return refused == 2 && data == original;
    });
    CHECK_MESSAGE(memshuffle::testing::exited_with(status, 0), memshuffle::testing::describe(status));
    // The parent goes on as before.
    bytes data = original, tag(c.tag_size());
    c.seal(iv, {}, data, tag);
    CHECK(data != original);
    c.open(iv, {}, data, tag);
    CHECK(data == original);
  }
}

TEST_CASE("a cipher destroyed in a child made by fork() frees its secret memory without touching it") {
  for (auto kind : encrypting_ciphers) {
    CAPTURE(static_cast<int>(kind));
    page_resource secret_pages;
    auto c = std::make_unique<cipher>(kind, fixed_key, &secret_pages);
    bytes data(64), tag(c->tag_size());
    c->seal(bytes(kind == cipher_kind::aes_256_ctr ? 16 : 12), {}, data, tag);
    REQUIRE(!secret_pages.pages.empty());
    const int status = memshuffle::testing::run_in_child([&] {
      // As memfd_secret memory in a child: any read or write of it faults.
      memshuffle::testing::default_segv_action();
      secret_pages.make_inaccessible();
      c.reset();
      return secret_pages.deallocations == secret_pages.pages.size();
    });
    CHECK_MESSAGE(memshuffle::testing::exited_with(status, 0), memshuffle::testing::describe(status));
    c.reset();
    CHECK(secret_pages.deallocations == secret_pages.pages.size());
  }
}


TEST_CASE("the first seal and open in a process leave no key material or plaintext on the stack") {
  // Measured: libcrypto++ is bound lazily, and the dynamic linker's first resolution of
  // each of its internal calls saved the vector registers, round keys and plaintext
  // among them, on the stack. The cipher binds those paths under a throwaway key first.
  if (memshuffle::detail::address_sanitizer) return;  // its fake stacks move the frames
  if (std::getenv("MEMSHUFFLE_FRESH_PROCESS") == nullptr) {
    const int status = run_in_fresh_process(
        "the first seal and open in a process leave no key material or plaintext on the stack");
    CHECK_MESSAGE(memshuffle::testing::exited_with(status, 0), memshuffle::testing::describe(status));
    return;
  }
  {
    // Binds this program's own calls of the cipher without using Crypto++.
    const cipher none(cipher_kind::none, fixed_key);
    bytes data(16);
    none.seal({}, {}, data, {});
    none.open({}, {}, data, {});
  }
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  for (auto kind : {cipher_kind::aes_256_gcm, cipher_kind::aes_256_ctr}) {
    CAPTURE(static_cast<int>(kind));
    const bool gcm = kind == cipher_kind::aes_256_gcm;
    const cipher c(kind, fixed_key);
    block first{};
    if (gcm) first[15] = std::byte{1};
    for (std::size_t n : {16, 100, 4096 + 7}) {
      CAPTURE(n);
      const bytes plaintext = random_bytes(rng, n), iv(gcm ? 12 : 16);
      secret_blocks secret = key_material(fixed_key, first, n / 16 + 2, gcm ? 4 : 16, gcm);
      secret.add_data(plaintext);
      bytes data = plaintext, tag(c.tag_size());
      scrub_stack();
      c.seal(iv, {}, data, tag);
      CHECK(stack_occurrences(secret) == 0);
      scrub_stack();
      c.open(iv, {}, data, tag);
      CHECK(stack_occurrences(secret) == 0);
      REQUIRE(data == plaintext);
    }
  }
}
}  // TEST_SUITE("crypto")

TEST_SUITE("concurrency") {

TEST_CASE("one cipher seals and opens on several threads at once with the results of one thread") {
  MEMSHUFFLE_TEST_SEED(seed);
  for (auto kind : encrypting_ciphers) {
    CAPTURE(static_cast<int>(kind));
    std::mt19937_64 rng(seed);
    const cipher c(kind, random_bytes(rng, 32));
    struct job {
      bytes iv, plaintext, expected, tag;
    };
    std::vector<job> jobs;
    for (int i = 0; i < 64; ++i) {
      job j{random_bytes(rng, 16), random_bytes(rng, 1 + rng() % 5000), {}, bytes(c.tag_size())};
      j.expected = j.plaintext;
      c.seal(j.iv, {}, j.expected, j.tag);
      jobs.push_back(std::move(j));
    }
    std::vector<int> failures(4, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
      threads.emplace_back([&, t] {
        for (int round = 0; round < 50; ++round)
          for (const auto& j : jobs) {
            bytes data = j.plaintext, tag(c.tag_size());
            c.seal(j.iv, {}, data, tag);
            if (data != j.expected || tag != j.tag) ++failures[static_cast<std::size_t>(t)];
            c.open(j.iv, {}, data, tag);
            if (data != j.plaintext) ++failures[static_cast<std::size_t>(t)];
          }
      });
    for (auto& th : threads) th.join();
    CHECK(failures == std::vector<int>(4, 0));
  }
}

// Sealing needs no memory (a lease's end must always seal its entry): with its secret
// memory refusing every allocation and no pooled object made yet, a GCM cipher still
// seals on several threads at once, each result the one a fresh cipher gives.
TEST_CASE("a GCM cipher whose secret memory refuses everything still seals on several threads at once") {
  MEMSHUFFLE_TEST_SEED(seed);
  std::mt19937_64 rng(seed);
  const bytes key = random_bytes(rng, 32);
  memshuffle::testing::recording_resource secret;
  const cipher c(cipher_kind::aes_256_gcm, key, &secret), reference(cipher_kind::aes_256_gcm, key);
  struct job {
    bytes iv, plaintext, expected, tag;
  };
  std::vector<job> jobs;
  for (int i = 0; i < 16; ++i) {
    job j{random_bytes(rng, 12), random_bytes(rng, 1 + rng() % 300), {}, bytes(cipher::gcm_tag_size)};
    j.expected = j.plaintext;
    reference.seal(j.iv, {}, j.expected, j.tag);
    jobs.push_back(std::move(j));
  }
  secret.fail_after(0, false);
  std::vector<int> failures(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round)
        for (const auto& j : jobs) {
          bytes data = j.plaintext, tag(cipher::gcm_tag_size);
          try {
            c.seal(j.iv, {}, data, tag);
          } catch (...) {
            ++failures[static_cast<std::size_t>(t)];
            continue;
          }
          if (data != j.expected || tag != j.tag) ++failures[static_cast<std::size_t>(t)];
        }
    });
  for (auto& th : threads) th.join();
  CHECK(secret.failures_injected() >= 1);  // new objects were asked for and refused
  CHECK(failures == std::vector<int>(4, 0));
}

}  // TEST_SUITE("concurrency")
