// The custody tests' scanner, checked against what it must find: planted markers, a
// planted raw key, AES-256 key schedules (Crypto++'s own and hand-built ones in each
// word order), and nothing in mappings a core dump leaves out.
#include <doctest/doctest.h>

#include <cryptopp/aes.h>
#include <sys/mman.h>

#include <memshuffle/detail/sanitizers.hpp>
#include <memshuffle/secure_page_resource.hpp>
#include <memshuffle/secure_wipe.hpp>
#include <test/support/memory_scan.hpp>
#include <test/support/seed.hpp>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <vector>

using namespace memshuffle::testing;

namespace {

std::vector<std::byte> heap_copy(std::span<const std::byte> s) { return {s.begin(), s.end()}; }

// A needle of n bytes from the seed, kept where the scan cannot see it, and a scan for it.
struct planted {
  hidden_bytes needle;
  memory_scan scan;
  planted(std::size_t n, std::uint64_t seed, const char* name) : needle(n) {
    fill_from_seed(needle.span(), seed);
    scan.add(name, needle.span());
  }
};

void require_clean(const scan_report& r) {
  INFO(r.summary());
  CHECK(r.unexpected_unreadable().empty());
  for (const auto& u : r.unexpected_unreadable()) MESSAGE("unreadable: ", u);
}

}  // namespace

TEST_SUITE("custody") {

TEST_CASE("the scan finds each heap copy of a planted marker, and not the hidden original") {
  MEMSHUFFLE_TEST_SEED(seed);
  planted p(32, seed, "marker");
  const auto& [marker, scan] = p;
  CHECK(scan.run().count("marker") == 0);

  auto one = heap_copy(marker.span());
  auto two = std::make_unique<std::array<std::byte, 4096>>();
  std::memcpy(two->data() + 1001, marker.data(), marker.size());  // unaligned on purpose
  const auto r = scan.run();
  require_clean(r);
  INFO(r.where());
  CHECK(r.count("marker") == 2);

  memshuffle::secure_wipe(one.data(), one.size());
  CHECK(scan.run().count("marker") == 1);
  memshuffle::secure_wipe(two->data(), two->size());
  CHECK(scan.run().count("marker") == 0);
}

TEST_CASE("the scan finds a planted raw key across the boundary of the chunks it reads") {
  MEMSHUFFLE_TEST_SEED(seed);
  planted p(32, seed, "key");
  const auto& [key, scan] = p;
  // 3 MiB of heap with the key across each 1 MiB boundary of the block (the scan reads
  // mappings in 1 MiB chunks; a block's offsets are the chunks' up to a page).
  std::vector<std::byte> big(std::size_t{3} << 20);
  std::size_t planted = 0;
  for (std::size_t at = (std::size_t{1} << 20) - 17; at + 32 < big.size(); at += std::size_t{1} << 20, ++planted)
    std::memcpy(big.data() + at, key.data(), 32);
  for (std::size_t at = 4000; at < 4096 * 5; at += 4096, ++planted) std::memcpy(big.data() + at, key.data(), 32);
  const auto r = scan.run();
  INFO(r.where());
  CHECK(r.count("key") == planted);
  memshuffle::secure_wipe(big.data(), big.size());
}

TEST_CASE("the key expansion matches FIPS-197 and its schedules are recognised in every word order") {
  // FIPS-197 appendix A.3: the key and the last word w[59] of its expansion.
  const unsigned char a3[32] = {0x60, 0x3d, 0xeb, 0x10, 0x15, 0xca, 0x71, 0xbe, 0x2b, 0x73, 0xae,
                                0xf0, 0x85, 0x7d, 0x77, 0x81, 0x1f, 0x35, 0x2c, 0x07, 0x3b, 0x61,
                                0x08, 0xd7, 0x2d, 0x98, 0x10, 0xa3, 0x09, 0x14, 0xdf, 0xf4};
  // Everything made here stays in a hidden mapping: later scans must not count it.
  hidden_bytes mem(32 + 240 + 240);
  std::byte* key = mem.data();
  std::byte* rk = key + 32;
  std::byte* other = rk + 240;
  std::memcpy(key, a3, 32);
  expand_aes256_key({key, 32}, {rk, 240});
  const std::array<std::byte, 4> w59{std::byte{0x70}, std::byte{0x6c}, std::byte{0x63}, std::byte{0x1e}};
  CHECK(std::memcmp(rk + 236, w59.data(), 4) == 0);
  CHECK(is_aes256_schedule(rk));

  auto swapped = [&](std::size_t from, std::size_t to) {
    std::memcpy(other, rk, 240);
    for (std::size_t i = from; i < to; ++i) std::reverse(other + 4 * i, other + 4 * i + 4);
    return other;
  };
  CHECK(is_aes256_schedule(swapped(0, 60)));
  CHECK(is_aes256_schedule(swapped(4, 56)));  // Crypto++'s table path

  for (std::size_t bit : {0u, 8 * 100u + 3, 8 * 239u + 7}) {
    std::memcpy(other, rk, 240);
    other[bit / 8] ^= std::byte(1u << (bit % 8));
    CHECK_FALSE(is_aes256_schedule(other));
  }
  std::memset(other, 0, 240);
  CHECK_FALSE(is_aes256_schedule(other));
}

TEST_CASE("the scan finds the schedule of a Crypto++ AES-256 object on the heap without knowing its key") {
  MEMSHUFFLE_TEST_SEED(seed);
  hidden_bytes key(32);
  fill_from_seed(key.span(), seed);
  memory_scan scan;
  scan.find_schedules();
  const std::size_t before = scan.run().count(schedule_item);
  {
    auto aes = std::make_unique<CryptoPP::AES::Encryption>(reinterpret_cast<const CryptoPP::byte*>(key.data()), 32);
    const auto r = scan.run();
    INFO(r.where());
    require_clean(r);
    CHECK(r.count(schedule_item) == before + 1);
    MESSAGE("a whole-process scan: ", r.summary());
  }
  CHECK(scan.run().count(schedule_item) == before);  // its SecBlock wiped it

  // A hand-built one in the table path's order, at an odd 4-byte offset.
  auto heap = std::make_unique<std::array<std::byte, 1024>>();
  std::array<std::byte, 240> rk{};
  expand_aes256_key(key.span(), rk);
  for (std::size_t i = 4; i < 56; ++i) std::reverse(rk.begin() + 4 * i, rk.begin() + 4 * i + 4);
  std::memcpy(heap->data() + 4 * 37, rk.data(), rk.size());
  memshuffle::secure_wipe(rk.data(), rk.size());
  CHECK(scan.run().count(schedule_item) == before + 1);
  memshuffle::secure_wipe(heap->data(), heap->size());
}

TEST_CASE("the scan skips mappings left out of core dumps, and only those") {
  MEMSHUFFLE_TEST_SEED(seed);
  planted p(48, seed, "marker");
  const auto& [marker, scan] = p;
  hidden_bytes page(4096);
  std::memcpy(page.data() + 100, marker.data(), marker.size());
  CHECK(scan.run().count("marker") == 0);
  REQUIRE(::madvise(page.data(), 4096, MADV_DODUMP) == 0);
  const auto r = scan.run();
  INFO(r.where());
  CHECK(r.count("marker") == 1);
  REQUIRE(::madvise(page.data(), 4096, MADV_DONTDUMP) == 0);
  CHECK(scan.run().count("marker") == 0);
}

TEST_CASE("secret memory is told apart: locked and left out of dumps, or memfd_secret") {
  memshuffle::secure_page_resource pages;
  void* p = pages.allocate(64);
  CHECK(in_secret_memory(p) == pages.locked());
  auto heap = std::make_unique<int>(1);
  CHECK_FALSE(in_secret_memory(heap.get()));
  hidden_bytes dd(64);  // left out of dumps but not locked: not secret memory
  CHECK(in_secret_memory(dd.data()) == (memshuffle::detail::address_sanitizer || memshuffle::detail::thread_sanitizer));
  pages.deallocate(p, 64);
}

}  // TEST_SUITE
