// The resource for the library's large metadata: blocks of a huge page or more mapped
// on their own and advised to use transparent huge pages, the rest from new and delete.
#include <doctest/doctest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "lib/huge_page_resource.hpp"
#include "test/support/smaps.hpp"

using memshuffle::detail::huge_page_resource;

namespace {

// What the kernel says of transparent huge pages: absent, or its mode is never.
bool kernel_refuses_huge_pages() {
  std::ifstream mode("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  return !std::getline(mode, line) || line.find("[never]") != std::string::npos;
}

}  // namespace

TEST_CASE("a block of a huge page or more is mapped on its own, aligned to the huge page size") {
  huge_page_resource& r = huge_page_resource::instance();
  const std::size_t page = huge_page_resource::page_size();
  REQUIRE(page >= 4096);
  CHECK((page & (page - 1)) == 0);
  const std::size_t before = r.mapped_bytes();
  void* p = r.allocate(2 * page + 1, 64);
  CHECK(reinterpret_cast<std::uintptr_t>(p) % page == 0);
  CHECK(r.mapped_bytes() == before + 3 * page);
  std::memset(p, 0xA5, 2 * page + 1);
  CHECK(static_cast<unsigned char*>(p)[2 * page] == 0xA5);
  r.deallocate(p, 2 * page + 1, 64);
  CHECK(r.mapped_bytes() == before);
}

TEST_CASE("a block smaller than a huge page comes from new and delete, not from a mapping") {
  huge_page_resource& r = huge_page_resource::instance();
  const std::size_t before = r.mapped_bytes();
  void* p = r.allocate(4096, 256);
  CHECK(reinterpret_cast<std::uintptr_t>(p) % 256 == 0);
  CHECK(r.mapped_bytes() == before);
  std::memset(p, 1, 4096);
  r.deallocate(p, 4096, 256);
}

TEST_CASE("a block the system cannot map throws std::bad_alloc and maps nothing") {
  huge_page_resource& r = huge_page_resource::instance();
  const std::size_t before = r.mapped_bytes();
  CHECK_THROWS_AS((void)r.allocate(std::numeric_limits<std::size_t>::max() / 2, 8), std::bad_alloc);
  CHECK_THROWS_AS((void)r.allocate(std::numeric_limits<std::size_t>::max() - 1, 8), std::bad_alloc);
  CHECK(r.mapped_bytes() == before);
}

TEST_CASE("a mapped block carries the huge page advice where the kernel takes it, and says so where not") {
  huge_page_resource& r = huge_page_resource::instance();
  const std::size_t page = huge_page_resource::page_size();
  void* p = r.allocate(page, 8);
  static_cast<char*>(p)[0] = 1;
  REQUIRE(!memshuffle::testing::vm_flags(p).empty());
  const bool advised = memshuffle::testing::has_flag(p, "hg");
  if (kernel_refuses_huge_pages()) {
    CHECK_FALSE(huge_page_resource::advice_taken());
    MESSAGE("this kernel has no transparent huge pages: metadata stays on ordinary pages");
  } else {
    CHECK(huge_page_resource::advice_taken() == advised);
    if (!advised) MESSAGE("the kernel refused MADV_HUGEPAGE: metadata stays on ordinary pages");
  }
  CHECK(huge_page_resource::on_huge_pages(page) == huge_page_resource::advice_taken());
  CHECK_FALSE(huge_page_resource::on_huge_pages(page - 1));
  r.deallocate(p, page, 8);
}

TEST_CASE("fault_in makes every page of a block resident and leaves its bytes as they were") {
  auto& r = huge_page_resource::instance();
  const std::size_t bytes = 2 * huge_page_resource::page_size();
  auto* p = static_cast<unsigned char*>(r.allocate(bytes));
  const auto page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const auto resident = [&] {
    std::vector<unsigned char> in(bytes / page);
    REQUIRE(mincore(p, bytes, in.data()) == 0);
    return static_cast<std::size_t>(std::count_if(in.begin(), in.end(), [](unsigned char v) { return (v & 1) != 0; }));
  };
  CHECK(resident() == 0);  // a fresh mapping: nothing touched yet
  huge_page_resource::fault_in(p, bytes);
  CHECK(resident() == bytes / page);
  CHECK(std::all_of(p, p + bytes, [](unsigned char v) { return v == 0; }));
  p[0] = 0x5A;
  p[bytes - 1] = 0xA5;
  huge_page_resource::fault_in(p, bytes);
  CHECK(p[0] == 0x5A);
  CHECK(p[bytes - 1] == 0xA5);
  r.deallocate(p, bytes);
}
