#pragma once
// Page spans from one of the secret backends, fenced by guard pages: the piece the
// secret pool (and anything else holding secrets in whole pages) maps and unmaps
// through. Every fallible call to the kernel goes through one fault-injection point.
#include <memshuffle/secret_backend.hpp>

#include <cstddef>
#include <cstdint>

namespace memshuffle::detail {

struct page_span {
  std::byte* reservation = nullptr;  // the whole mapping, guard pages included
  std::size_t reserved = 0;
  std::byte* data = nullptr;         // the readable pages
  std::size_t usable = 0;
  secret_backend backend = secret_backend::locked_pages;  // what it really is
  bool locked = false;
  std::uint64_t epoch = 0;           // fork_epoch() when it was mapped
};

std::size_t page_size() noexcept;

// True when memfd_secret(2) works on this kernel (probed once, never fault-injected).
bool secret_memory_supported() noexcept;

// Maps `usable` bytes (a multiple of page_size()) with a guard page on each side, from
// `backend` (secret_memory or locked_pages). A lock refused, or secret memory that
// cannot grow: under fail, throws secret_memory_refused; under degrade, returns
// unlocked anonymous pages (no-dump, wiped on fork) with locked == false. Other
// failures throw std::bad_alloc. Nothing stays mapped when it throws.
page_span map_secret_pages(std::size_t usable, secret_backend backend, on_lock_refused policy);

// Wipes, unlocks and unmaps a span mapped in this process (same fork epoch).
void unmap_secret_pages(const page_span& span) noexcept;

// In a child of fork(): replaces a span of the parent with an inaccessible
// reservation without reading or writing it (its pages are gone or zero here), so its
// addresses are never handed out again while stale pointers to them may still be freed.
void abandon_secret_pages(const page_span& span) noexcept;

// Fault injection, for tests: the n-th fallible kernel call from now (0: the next one)
// fails as if refused (mlock and a secret mmap with EAGAIN, the others with ENOMEM).
// A negative n turns it off. Returns how many calls are left before the failure
// (negative once it fired or when off).
void inject_page_fault(long n) noexcept;
long page_fault_countdown() noexcept;

}  // namespace memshuffle::detail
