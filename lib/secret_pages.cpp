#include "secret_pages.hpp"

#include "fork_epoch.hpp"

#include <memshuffle/secure_wipe.hpp>

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>

#ifndef SYS_memfd_secret
#define SYS_memfd_secret 447   // x86-64 and arm64; glibc has no wrapper
#endif

namespace memshuffle {

const char* to_string(secret_backend backend) noexcept {
  switch (backend) {
    case secret_backend::automatic: return "automatic";
    case secret_backend::secret_memory: return "secret_memory";
    case secret_backend::locked_pages: return "locked_pages";
  }
  return "unknown";
}

}  // namespace memshuffle

namespace memshuffle::detail {

namespace {

std::atomic<long> countdown{-1};

// True when the injected failure is due now; sets errno as the kernel would.
bool injected(int err) noexcept {
  long left = countdown.load(std::memory_order_relaxed);
  while (left >= 0 && !countdown.compare_exchange_weak(left, left - 1)) {
  }
  if (left != 0) return false;
  errno = err;
  return true;
}

void* reserve(std::size_t length) noexcept {
  if (injected(ENOMEM)) return MAP_FAILED;
  return ::mmap(nullptr, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
}

bool is_refusal(int err) noexcept { return err == EAGAIN || err == ENOMEM || err == EPERM; }

[[noreturn]] void refuse(const char* what, int err) {
  throw secret_memory_refused(std::string("memshuffle: ") + what + ": " + std::strerror(err));
}

// Maps secret memory over span.data. Returns 0, or -errno when the mapping itself was
// refused for want of lock budget, or errno of another failure.
int map_secret(page_span& span) noexcept {
  const int fd = injected(EMFILE) ? -1 : static_cast<int>(::syscall(SYS_memfd_secret, 0u));
  if (fd < 0) return errno;
  int err = 0;
  if (injected(ENOMEM) || ::ftruncate(fd, static_cast<off_t>(span.usable)) != 0) err = errno;
  if (err == 0 && (injected(EAGAIN) ||
                   ::mmap(span.data, span.usable, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                          fd, 0) == MAP_FAILED))
    err = is_refusal(errno) ? -errno : errno;
  ::close(fd);   // the mapping keeps the file
  // A child must not inherit a shared mapping of the secret.
  if (err == 0 && (injected(ENOMEM) || ::madvise(span.data, span.usable, MADV_DONTFORK) != 0))
    err = ENOMEM;
  if (err != 0) return err;
  span.backend = secret_backend::secret_memory;
  span.locked = true;
  return 0;
}

// Makes span.data anonymous, no-dump, wiped in a fork child, and, if `lock`, locked.
// Returns 0, or -errno of the mlock refusal, or errno of another failure.
int map_locked(page_span& span, bool lock) noexcept {
  // MAP_FIXED also replaces what a failed secret mapping may have left behind.
  if (injected(ENOMEM) || ::mmap(span.data, span.usable, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
    return errno;
  if (injected(ENOMEM) || ::madvise(span.data, span.usable, MADV_WIPEONFORK) != 0) return errno;
  if (injected(ENOMEM) || ::madvise(span.data, span.usable, MADV_DONTDUMP) != 0) return errno;
  span.backend = secret_backend::locked_pages;
  if (!lock) return 0;
  if (injected(EAGAIN) || ::mlock(span.data, span.usable) != 0) return -errno;
  span.locked = true;
  return 0;
}

}  // namespace

std::size_t page_size() noexcept {
  static const std::size_t size = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

bool secret_memory_supported() noexcept {
  static const bool supported = [] {
    const long fd = ::syscall(SYS_memfd_secret, 0u);
    if (fd < 0) return false;
    ::close(static_cast<int>(fd));
    return true;
  }();
  return supported;
}

page_span map_secret_pages(std::size_t usable, secret_backend backend, on_lock_refused policy) {
  const std::size_t guard = page_size();
  page_span span;
  void* base = reserve(usable + 2 * guard);
  if (base == MAP_FAILED) throw std::bad_alloc();
  span.reservation = static_cast<std::byte*>(base);
  span.reserved = usable + 2 * guard;
  span.data = span.reservation + guard;
  span.usable = usable;
  span.epoch = fork_epoch();
  int err = backend == secret_backend::secret_memory ? map_secret(span) : map_locked(span, true);
  if (err == 0) return span;
  bool refused = err < 0;
  if (refused) err = -err;
  // Degrade only what a refused lock can explain; never map unlocked under fail.
  if (refused && policy == on_lock_refused::degrade) {
    span.locked = false;
    if (map_locked(span, false) == 0) return span;
    err = ENOMEM;
    refused = false;
  }
  ::munmap(span.reservation, span.reserved);
  if (refused) refuse(backend == secret_backend::secret_memory ? "secret memory cannot grow"
                                                               : "mlock refused", err);
  throw std::bad_alloc();
}

void unmap_secret_pages(const page_span& span) noexcept {
  secure_wipe(span.data, span.usable);
  if (span.locked && span.backend == secret_backend::locked_pages) ::munlock(span.data, span.usable);
  ::munmap(span.reservation, span.reserved);
}

void abandon_secret_pages(const page_span& span) noexcept {
  ::mmap(span.reservation, span.reserved, PROT_NONE,
         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
}

void inject_page_fault(long n) noexcept { countdown.store(n < 0 ? -1 : n); }

long page_fault_countdown() noexcept { return countdown.load(); }

}  // namespace memshuffle::detail
