#include <memshuffle/secure_page_resource.hpp>
#include <memshuffle/error.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>

namespace memshuffle {

std::size_t secure_page_resource::page_size() noexcept {
  static const std::size_t size = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

secure_page_resource::secure_page_resource(secure_page_options options) : options_(options) {}

secure_page_resource::~secure_page_resource() {
  for (auto& [p, r] : regions_) release(r);
}

secure_page_stats secure_page_resource::stats() const {
  std::lock_guard lock(m_);
  return stats_;
}

bool secure_page_resource::locked() const {
  std::lock_guard lock(m_);
  if (!options_.lock) return false;
  for (auto& [p, r] : regions_)
    if (!r.locked) return false;
  return true;
}

void* secure_page_resource::do_allocate(std::size_t bytes, std::size_t alignment) {
  const std::size_t page = page_size();
  if (!std::has_single_bit(alignment) || alignment > page) throw bad_alignment();
  const std::size_t wanted = bytes == 0 ? 1 : bytes;
  if (wanted > SIZE_MAX - 3 * page) throw std::bad_alloc();
  const std::size_t usable = (wanted + page - 1) / page * page;
  const std::size_t guard = options_.guard_pages ? page : 0;
  const std::size_t mapped = usable + 2 * guard;

  void* base = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) throw std::bad_alloc();
  auto* data = static_cast<std::byte*>(base) + guard;
  region r{base, mapped, usable, false};
  if (guard != 0 && (::mprotect(base, guard, PROT_NONE) != 0 ||
                     ::mprotect(data + usable, guard, PROT_NONE) != 0)) {
    ::munmap(base, mapped);
    throw std::bad_alloc();
  }
  if (options_.dont_dump) ::madvise(base, mapped, MADV_DONTDUMP);  // best effort
  if (options_.wipe_on_fork) ::madvise(data, usable, MADV_WIPEONFORK);
  if (options_.lock) r.locked = ::mlock(data, usable) == 0;
  if (options_.lock && !r.locked && options_.lock_refused == on_lock_refused::fail) {
    const int err = errno;
    ::munmap(base, mapped);
    throw secret_memory_refused(std::string("memshuffle: secure_page_resource: mlock refused: ") +
                                std::strerror(err));
  }

  // The end of the block abuts the trailing guard page.
  const auto end = reinterpret_cast<std::uintptr_t>(data + usable);
  void* p = reinterpret_cast<void*>((end - wanted) & ~(std::uintptr_t{alignment} - 1));
  try {
    std::lock_guard lock(m_);
    regions_.emplace(p, r);
    stats_.bytes_mapped += mapped;
    if (r.locked) stats_.bytes_locked += usable;
    if (options_.lock && !r.locked) ++stats_.lock_failures;
    ++stats_.allocations;
    ++stats_.total_allocations;
  } catch (...) {
    release(r);
    throw;
  }
  return p;
}

void secure_page_resource::do_deallocate(void* p, std::size_t, std::size_t) {
  region r;
  {
    std::lock_guard lock(m_);
    auto it = regions_.find(p);
    if (it == regions_.end()) return;
    r = it->second;
    regions_.erase(it);
    stats_.bytes_mapped -= r.mapped;
    if (r.locked) stats_.bytes_locked -= r.usable;
    --stats_.allocations;
  }
  release(r);
}

void secure_page_resource::release(const region& r) noexcept {
  const std::size_t guard = (r.mapped - r.usable) / 2;
  auto* data = static_cast<std::byte*>(r.base) + guard;
  secure_wipe(data, r.usable);
  if (r.locked) ::munlock(data, r.usable);
  ::munmap(r.base, r.mapped);
}

bool secure_page_resource::do_is_equal(const std::pmr::memory_resource& other) const noexcept {
  return this == &other;
}

}  // namespace memshuffle
