#pragma once
// Runs a piece of a test in a forked child, for what must not happen in the test
// process itself: a deliberate segmentation fault, or a lowered RLIMIT_MEMLOCK.
#include <linux/capability.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include <memshuffle/detail/sanitizers.hpp>

namespace memshuffle::testing {

// The address and thread sanitizers replace mlock with a no-op that reports success,
// so tests of refused locking cannot run under them.
inline constexpr bool mlock_is_real = !detail::address_sanitizer && !detail::thread_sanitizer;

// Runs fn in a child and returns its wait status. The child exits 0 when fn returns
// true, 1 when it returns false, 2 when it throws; it never returns into the test.
template <class F>
int run_in_child(F&& fn) {
  // Output still buffered would otherwise be written twice, once by the child.
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    int code = 2;
    try {
      code = fn() ? 0 : 1;
    } catch (...) {
    }
    ::_exit(code);
  }
  if (pid < 0) return -1;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
  }
  return status;
}

inline bool exited_with(int status, int code) {
  return WIFEXITED(status) && WEXITSTATUS(status) == code;
}
inline bool killed_by(int status, int signal) {
  return WIFSIGNALED(status) && WTERMSIG(status) == signal;
}
inline std::string describe(int status) {
  if (WIFEXITED(status)) return "exited with " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
  return "status " + std::to_string(status);
}

// In a child about to fault on purpose: give SIGSEGV back its default action, so the
// child dies of the signal even when a sanitizer installed its own handler.
inline void default_segv_action() {
  struct sigaction sa {};
  sa.sa_handler = SIG_DFL;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGSEGV, &sa, nullptr);
  ::sigaction(SIGBUS, &sa, nullptr);
}

// In a child: make mlock obey RLIMIT_MEMLOCK = bytes, even when running as root (which
// holds CAP_IPC_LOCK and would otherwise ignore the limit). Returns false on failure.
inline bool limit_memlock(std::size_t bytes) {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct caps[_LINUX_CAPABILITY_U32S_3]{};
  if (::syscall(SYS_capget, &header, caps) != 0) return false;
  const unsigned ipc_lock = 1u << CAP_IPC_LOCK;
  caps[0].effective &= ~ipc_lock;
  caps[0].permitted &= ~ipc_lock;
  caps[0].inheritable &= ~ipc_lock;
  if (::syscall(SYS_capset, &header, caps) != 0) return false;
  const rlimit limit{bytes, bytes};
  return ::setrlimit(RLIMIT_MEMLOCK, &limit) == 0;
}

}  // namespace memshuffle::testing
