#pragma once
// Where secret memory comes from, what was actually obtained, and what happens when
// the kernel refuses to lock it (docs/security.md, "Secret memory").
#include <cstddef>
#include <new>
#include <string>

namespace memshuffle {

/// Where a resource for secrets gets its pages.
enum class secret_backend {
  automatic,      ///< secret_memory where the kernel gives it, else locked_pages (reported)
  secret_memory,  ///< memfd_secret(2): gone from the kernel's direct map, absent in a fork child
  locked_pages,   ///< anonymous pages: mlock, MADV_DONTDUMP, MADV_WIPEONFORK (zeros in a child)
};

/// What to do when a lock is refused (RLIMIT_MEMLOCK) or secret memory cannot grow.
enum class on_lock_refused {
  fail,     ///< throw secret_memory_refused; nothing allocated, nothing changed
  degrade,  ///< hand out unlocked pages (still no-dump, wiped on fork), counted and reported
};

/// What a child of fork() finds where the parent's secret pages were.
enum class fork_behaviour {
  absent,  ///< no mapping at all (secret memory: MADV_DONTFORK)
  zeroed,  ///< pages of zeros (locked pages: MADV_WIPEONFORK)
};

/// What a resource actually obtained from the kernel, as opposed to what it asked for.
struct secret_memory_report {
  secret_backend backend = secret_backend::locked_pages;  ///< never automatic
  bool locked = true;                 ///< every live page is locked in RAM (never swapped)
  bool excluded_from_dumps = true;    ///< every page is left out of core dumps
  fork_behaviour in_fork_child = fork_behaviour::zeroed;  ///< what a fork child finds there
  bool guard_pages = true;            ///< inaccessible pages around every run of pages
  bool degraded = false;              ///< anything weaker than asked was ever obtained
  std::size_t fallbacks = 0;          ///< automatic fell back from secret memory: 0 or 1
  std::size_t lock_refusals = 0;      ///< mappings handed out unlocked under degrade, ever
};

/// "secret_memory", "locked_pages" or "automatic".
/// \returns the name of \p backend as written in the enumeration.
const char* to_string(secret_backend backend) noexcept;

/// A lock refused, secret memory that cannot grow, or a backend the kernel lacks, under
/// on_lock_refused::fail. Derives from std::bad_alloc so allocation-failure handling
/// already in place catches it.
class secret_memory_refused : public std::bad_alloc {
 public:
  /// \effects keeps \p why as the message.
  explicit secret_memory_refused(std::string why) : why_(std::move(why)) {}
  /// \returns why the memory was refused, with the errno text of the refusing call.
  const char* what() const noexcept override { return why_.c_str(); }

 private:
  std::string why_;
};

}  // namespace memshuffle
