#pragma once
// An attacker's view of the own process, for the custody tests (docs/security.md,
// "How custody is tested"): reads every mapping a core dump would write (all but those
// marked `dd` in /proc/self/smaps) through /proc/self/mem, and counts given byte strings
// (plaintext markers, a raw key, a salt, the GCM hash key) and AES-256 expanded key
// schedules found without knowing the key, the way aeskeyfind finds them.
//
// The scan must not find its own copies: it reads into a buffer in a MADV_DONTDUMP
// mapping (which it skips), and the needles a test gives it should live in such a
// mapping too (hidden_bytes), built at run time, never as literals in the binary.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace memshuffle::testing {

// One mapping of /proc/self/smaps.
struct mapping {
  std::uintptr_t begin = 0, end = 0;
  std::string perms, name, flags;  // flags: the VmFlags line
  std::size_t rss = 0, swap = 0;   // bytes

  bool has_flag(std::string_view flag) const;
  // Left out of core dumps, so left out of the scan.
  bool dont_dump() const { return has_flag("dd"); }
  // The library's secret memory: a memfd_secret mapping, or locked and left out of dumps
  // (under a sanitizer, which makes mlock a no-op, left out of dumps).
  bool secret() const;
  std::size_t size() const { return end - begin; }
  std::string describe() const;
};

std::vector<mapping> read_mappings();

// Whether p lies in secret memory, as read_mappings() sees it now.
bool in_secret_memory(const void* p);

// n bytes in a private anonymous mapping marked MADV_DONTDUMP (not locked, so never
// mistaken for secret memory): where a test keeps what the scan must not find. Wiped
// and unmapped when it ends.
class hidden_bytes {
 public:
  explicit hidden_bytes(std::size_t n);
  ~hidden_bytes();
  hidden_bytes(const hidden_bytes&) = delete;
  hidden_bytes& operator=(const hidden_bytes&) = delete;
  std::byte* data() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }
  std::span<std::byte> span() const noexcept { return {p_, n_}; }

 private:
  std::byte* p_;
  std::size_t n_, mapped_;
};

// Bytes that depend only on seed, written straight into out (hidden_bytes, say).
void fill_from_seed(std::span<std::byte> out, std::uint64_t seed) noexcept;

// The AES-256 key expansion of key (32 bytes) into out (240 bytes), in byte order.
void expand_aes256_key(std::span<const std::byte> key, std::span<std::byte> out);

// Whether the 240 bytes at p are a valid AES-256 key schedule: the expansion of their
// first 32 bytes, each 32-bit word in byte order (the AES-NI path of Crypto++) or
// byte-swapped (its table path swaps all words but the first and last round key; plain
// big-endian word arrays swap all).
bool is_aes256_schedule(const std::byte* p) noexcept;

struct hit {
  std::uintptr_t address;
  std::string where;  // the mapping (or core file part) it lies in
};

struct scan_item {
  std::string name;
  std::size_t count = 0;
  std::vector<hit> hits;  // the first few, for the failure message
};

struct scan_report {
  std::vector<scan_item> items;  // one per needle, then the key schedules (when searched)
  std::vector<std::string> unreadable;  // mappings (or parts) a dump would write that could not be read
  std::vector<mapping> secret;          // secret memory, not read
  std::size_t skipped_dont_dump = 0;    // other dd mappings, not read
  std::size_t mappings_read = 0, bytes_read = 0;
  double seconds = 0;

  std::size_t count(std::string_view item) const;
  // Each item's count on one line, for doctest MESSAGE.
  std::string summary() const;
  // Every recorded hit of every item with its address and mapping.
  std::string where() const;
  // Unreadable mappings other than the kernel's own ([vsyscall], [vvar]...), which no
  // core dump holds either.
  std::vector<std::string> unexpected_unreadable() const;
};

inline constexpr std::string_view schedule_item = "AES-256 key schedule";

class memory_scan {
 public:
  memory_scan();
  ~memory_scan();
  memory_scan(const memory_scan&) = delete;
  memory_scan& operator=(const memory_scan&) = delete;

  // Searches for bytes (which should live in hidden_bytes), reported under name.
  void add(std::string name, std::span<const std::byte> bytes);
  // Searches for valid AES-256 key schedules at every 4-byte-aligned address too.
  void find_schedules(bool on = true) { schedules_ = on; }
  // Reads secret memory and other mappings left out of dumps too (up to 64 MiB each,
  // with plain loads; never hidden_bytes): for a fork child, which must hold no key
  // material even there.
  void include_secret(bool on = true) { secret_too_ = on; }

  // The whole own process.
  scan_report run() const;
  // A buffer that holds someone else's memory (a core file part, say), as if it lay at
  // base; hits go into report under where.
  void scan_buffer(std::span<const std::byte> data, std::uintptr_t base, const std::string& where,
                   scan_report& report) const;
  scan_report empty_report() const;

 private:
  struct needle {
    std::string name;
    std::span<const std::byte> bytes;
  };
  void search(const std::byte* buf, std::size_t n, std::size_t carry, std::uintptr_t base,
              const std::string& where, scan_report& report) const;
  void read_mapping(int fd, const mapping& m, scan_report& report) const;
  std::size_t overlap() const;

  std::vector<needle> needles_;
  bool schedules_ = false, secret_too_ = false;
  hidden_bytes buffer_;
};

}  // namespace memshuffle::testing
