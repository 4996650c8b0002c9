#include "huge_page_resource.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>

namespace memshuffle::detail {

namespace {
constexpr std::size_t fallback_page = std::size_t{2} << 20;

// advice_state: 0 not tried yet, 1 taken, 2 refused (or the kernel's mode is never).
std::atomic<int> advice_state{0};

std::size_t read_page_size() noexcept {
  std::size_t size = 0;
  if (std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r")) {
    unsigned long long v = 0;
    if (std::fscanf(f, "%llu", &v) == 1) size = static_cast<std::size_t>(v);
    std::fclose(f);
  }
  return size != 0 && (size & (size - 1)) == 0 ? size : fallback_page;
}

// "always [madvise] never": the advice is followed unless the mode is never.
bool read_mode_allows_advice() noexcept {
  char mode[128] = {};
  std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  if (f == nullptr) return false;
  const bool read = std::fgets(mode, sizeof mode, f) != nullptr;
  std::fclose(f);
  return read && std::strstr(mode, "[never]") == nullptr;
}

std::size_t round_up(std::size_t n, std::size_t to) noexcept { return (n + to - 1) / to * to; }
}  // namespace

huge_page_resource& huge_page_resource::instance() noexcept {
  static huge_page_resource r;
  return r;
}

std::size_t huge_page_resource::page_size() noexcept {
  static const std::size_t size = read_page_size();
  return size;
}

bool huge_page_resource::advice_taken() noexcept { return advice_state.load(std::memory_order_relaxed) == 1; }

void* huge_page_resource::do_allocate(std::size_t bytes, std::size_t alignment) {
  if (!mapped_alone(bytes, alignment)) return std::pmr::new_delete_resource()->allocate(bytes, alignment);
  const std::size_t page = page_size();
  if (bytes > SIZE_MAX - 2 * page) throw std::bad_alloc();
  // Mapped a page over, so that an aligned block of whole pages can be cut out of it.
  const std::size_t length = round_up(bytes, page);
  void* raw = ::mmap(nullptr, length + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const auto at = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t block = round_up(at, page);
  if (block != at) ::munmap(raw, block - at);
  if (const std::size_t tail = at + page - block; tail != 0) ::munmap(reinterpret_cast<void*>(block + length), tail);
  void* p = reinterpret_cast<void*>(block);
  // The kernel's answer is the same for every block: the first one is kept.
  static const bool mode_allows_advice = read_mode_allows_advice();
  int expected = 0;
  const bool taken = ::madvise(p, length, MADV_HUGEPAGE) == 0 && mode_allows_advice;
  advice_state.compare_exchange_strong(expected, taken ? 1 : 2, std::memory_order_relaxed);
  mapped_.fetch_add(length, std::memory_order_relaxed);
  return p;
}

void huge_page_resource::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) {
  if (!mapped_alone(bytes, alignment)) {
    std::pmr::new_delete_resource()->deallocate(p, bytes, alignment);
    return;
  }
  const std::size_t length = round_up(bytes, page_size());
  ::munmap(p, length);
  mapped_.fetch_sub(length, std::memory_order_relaxed);
}

void huge_page_resource::fault_in(void* p, std::size_t bytes) noexcept {
  static const auto step = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  auto* const begin = static_cast<unsigned char*>(p);
  // A write fault, as the block's user will write; or-ing zero keeps the byte.
  for (std::size_t at = 0; at < bytes; at += step)
    std::atomic_ref<unsigned char>(begin[at]).fetch_or(0, std::memory_order_relaxed);
}

}  // namespace memshuffle::detail
