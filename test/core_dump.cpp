// Custody in the kernel's own core dump: a child fills a shuffler, returns a lease and
// aborts at once; the test reads the core file (every PT_LOAD segment, and the
// registers the kernel saved in the NT_PRSTATUS, NT_FPREGSET and NT_X86_XSTATE notes)
// and finds no plaintext, key, salt, GCM hash key, round key or key schedule in it.
// Where core_pattern sends cores elsewhere (a pipe, another directory) the test cannot
// see the core: it says so and exits 77, which meson reports as skipped.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <memshuffle/detail/sanitizers.hpp>
#include <elf.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <memshuffle/shuffler.hpp>
#include <test/support/child_process.hpp>
#include <test/support/cipher_kinds.hpp>
#include <test/support/custody_helpers.hpp>
#include <test/support/custody_secrets.hpp>
#include <test/support/memory_scan.hpp>
#include <test/support/seed.hpp>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <string>

using namespace memshuffle;
using namespace memshuffle::testing;

namespace {

std::string read_line(const char* path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  return s;
}

// The core file's name for pid, in the directory the child runs in; nothing when the
// pattern puts it elsewhere or names it in a way this test does not follow.
std::optional<std::string> core_name(pid_t pid) {
  const std::string pattern = read_line("/proc/sys/kernel/core_pattern");
  if (pattern.empty() || pattern[0] == '|' || pattern.find('/') != std::string::npos) return std::nullopt;
  std::string name;
  bool has_pid = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '%') {
      name += pattern[i];
    } else if (i + 1 < pattern.size() && pattern[i + 1] == 'p') {
      name += std::to_string(pid), has_pid = true, ++i;
    } else if (i + 1 < pattern.size() && pattern[i + 1] == '%') {
      name += '%', ++i;
    } else {
      return std::nullopt;
    }
  }
  if (!has_pid && read_line("/proc/sys/kernel/core_uses_pid") == "1") name += "." + std::to_string(pid);
  return name;
}

constexpr std::array<std::pair<Elf64_Word, const char*>, 3> note_names{
    {{NT_PRSTATUS, "NT_PRSTATUS"}, {NT_FPREGSET, "NT_FPREGSET"}, {0x202, "NT_X86_XSTATE"}}};

// Scans every PT_LOAD segment and every register note of the core; counts the notes.
std::map<std::string, int> scan_core(std::span<const std::byte> core, const memory_scan& scan, scan_report& r) {
  std::map<std::string, int> notes;
  Elf64_Ehdr eh;
  REQUIRE(core.size() >= sizeof eh);
  std::memcpy(&eh, core.data(), sizeof eh);
  REQUIRE(std::memcmp(eh.e_ident, ELFMAG, SELFMAG) == 0);
  REQUIRE(eh.e_type == ET_CORE);
  for (std::size_t i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph;
    std::memcpy(&ph, core.data() + eh.e_phoff + i * sizeof ph, sizeof ph);
    REQUIRE(ph.p_offset + ph.p_filesz <= core.size());
    const auto seg = core.subspan(ph.p_offset, ph.p_filesz);
    if (ph.p_type == PT_LOAD) {
      scan.scan_buffer(seg, ph.p_vaddr, "PT_LOAD at " + std::to_string(ph.p_vaddr), r);
      continue;
    }
    if (ph.p_type != PT_NOTE) continue;
    for (std::size_t at = 0; at + sizeof(Elf64_Nhdr) <= seg.size();) {
      Elf64_Nhdr nh;
      std::memcpy(&nh, seg.data() + at, sizeof nh);
      const std::size_t desc = at + sizeof nh + (nh.n_namesz + 3) / 4 * 4;
      for (const auto& [type, name] : note_names)
        if (nh.n_type == type && desc + nh.n_descsz <= seg.size()) {
          ++notes[name];
          scan.scan_buffer(seg.subspan(desc, nh.n_descsz), 0, std::string("the registers in ") + name, r);
        }
      at = desc + (nh.n_descsz + 3) / 4 * 4;
    }
  }
  return notes;
}

// In the child: a filled shuffler, a lease written and returned, then at once abort().
[[noreturn]] void return_a_lease_and_dump(const custody_secrets& k, cipher_kind c, const std::string& dir) {
  if (::chdir(dir.c_str()) != 0) ::_exit(3);
  const rlimit core{RLIM_INFINITY, RLIM_INFINITY};
  ::setrlimit(RLIMIT_CORE, &core);
  struct sigaction sa {};
  sa.sa_handler = SIG_DFL;
  ::sigaction(SIGABRT, &sa, nullptr);
  auto s = k.make(c, std::pmr::get_default_resource());
  std::vector<handle> hs;
  for (std::uint32_t i = 0; i < 100; ++i) {
    hs.push_back(s->alloc<std::byte>(256));
    k.write_entry(*s, hs.back(), i);
  }
  {
    auto l = s->rent<std::byte>(hs[42]);
    k.fill_blocks(l.get(), l.size(), 42);
  }
  std::abort();
}

}  // namespace

TEST_CASE("a core file of a process that has just returned a lease holds no plaintext or key material") {
  MEMSHUFFLE_TEST_SEED(seed);
  for (cipher_kind c : encrypting_ciphers) {
    INFO((c == cipher_kind::aes_256_ctr ? "AES-256-CTR" : "AES-256-GCM"));
    custody_secrets k(seed);
    char tmpl[] = "/tmp/memshuffle-core-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    const std::string dir = tmpl;
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) return_a_lease_and_dump(k, c, dir);
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE_MESSAGE(WIFSIGNALED(status), describe(status));
    REQUIRE_MESSAGE(WCOREDUMP(status), "the child left no core dump");
    const auto name = core_name(pid);
    REQUIRE(name.has_value());
    const std::string path = dir + "/" + *name;

    // Read into a hidden mapping: the core holds what the scan looks for.
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    hidden_bytes core(static_cast<std::size_t>(st.st_size));
    {
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      REQUIRE(fd >= 0);
      std::size_t done = 0;
      for (ssize_t n; done < core.size() && (n = ::read(fd, core.data() + done, core.size() - done)) > 0;)
        done += static_cast<std::size_t>(n);
      ::close(fd);
      REQUIRE(done == core.size());
    }
    ::unlink(path.c_str());
    ::rmdir(dir.c_str());

    memory_scan scan;
    k.add_to(scan);
    // Registers hold 16 bytes: each round key of key 1 alone (the first two are the key).
    hidden_bytes rk(240);
    expand_aes256_key(std::as_bytes(std::span(k.key(0))), rk.span());
    for (std::size_t i = 0; i < 15; ++i) scan.add("round key " + std::to_string(i), rk.span().subspan(16 * i, 16));
    scan_report r = scan.empty_report();
    const auto notes = scan_core(core.span(), scan, r);
    MESSAGE("core of ", core.size() / 1024, " KiB; notes: NT_PRSTATUS ", notes.count("NT_PRSTATUS") ? notes.at("NT_PRSTATUS") : 0,
            ", NT_FPREGSET ", notes.count("NT_FPREGSET") ? notes.at("NT_FPREGSET") : 0, ", NT_X86_XSTATE ",
            notes.count("NT_X86_XSTATE") ? notes.at("NT_X86_XSTATE") : 0);
    CHECK(notes.count("NT_PRSTATUS") == 1);
    CHECK(notes.count("NT_FPREGSET") == 1);  // the vector registers are in the core
    check_clean(r);
  }
}

int main(int argc, char** argv) {
  // The custody promise is for builds without a sanitizer: under AddressSanitizer its
  // runtime's own code was seen leaving one 16-byte piece of the key on the stack,
  // which no production build runs. The whole-process scans (test/custody.cpp) do run
  // under the sanitizers.
  if (memshuffle::detail::address_sanitizer || memshuffle::detail::thread_sanitizer) {
    std::printf("core_dump: built with a sanitizer, whose runtime is not part of the custody promise: not run\n");
    return 77;
  }
  if (!core_name(::getpid())) {
    std::printf("core_dump: core_pattern is \"%s\": cores do not come to the crashing process's directory, "
                "so this test cannot read them: not run\n",
                read_line("/proc/sys/kernel/core_pattern").c_str());
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
