#pragma once
// What the kernel says about the mapping holding an address: its VmFlags line in
// /proc/self/smaps, and whether it is mapped at all.
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace memshuffle::testing {

inline std::uintptr_t address_of(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// True while the page holding p is mapped (msync reports ENOMEM for unmapped memory).
inline bool mapped(const void* p) {
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  void* start = reinterpret_cast<void*>(address_of(p) & ~(page - 1));
  return ::msync(start, page, MS_ASYNC) == 0 || errno != ENOMEM;
}

// The VmFlags line of the mapping holding p ("lo" locked, "dd" left out of core dumps,
// "wf" wiped on fork, "dc" not copied into a fork child); empty when unmapped.
inline std::string vm_flags(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    std::uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-') inside = lo <= address_of(p) && address_of(p) < hi;
    else if (inside && line.rfind("VmFlags:", 0) == 0) return line + " ";
  }
  return {};
}

// Every mapping of the process with its VmFlags line, read once.
struct mapping_flags {
  std::uintptr_t begin = 0, end = 0;
  std::string flags;
};
inline std::vector<mapping_flags> all_mappings() {
  std::vector<mapping_flags> out;
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  while (std::getline(smaps, line)) {
    std::uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-') out.push_back({lo, hi, {}});
    else if (!out.empty() && line.rfind("VmFlags:", 0) == 0) out.back().flags = line + " ";
  }
  return out;
}

inline bool has_flag(const void* p, const char* flag) {
  return vm_flags(p).find(std::string(" ") + flag + " ") != std::string::npos;
}

}  // namespace memshuffle::testing
