#include "test/support/memory_scan.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <memshuffle/detail/sanitizers.hpp>
#include <memshuffle/secure_wipe.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <new>
#include <sstream>
#include <stdexcept>

namespace memshuffle::testing {

namespace {

constexpr std::size_t page = 4096;
constexpr std::size_t chunk = std::size_t{1} << 20;
constexpr std::size_t max_needle = 64 * 1024;
constexpr std::size_t schedule_bytes = 240;
// Reading a large mapping that is mostly not populated would fault in zero pages one by
// one; those mappings are read page run by page run, as /proc/self/pagemap shows them.
constexpr std::size_t sparse_from = std::size_t{64} << 20;

// The hot loops are not instrumented: under the sanitizers the scan must stay fast.
#if defined(__GNUC__)
#define MEMSHUFFLE_SCAN_RAW __attribute__((no_sanitize("address", "undefined")))
#else
#define MEMSHUFFLE_SCAN_RAW
#endif

std::uint8_t rotl8(std::uint8_t x, int s) {
  return static_cast<std::uint8_t>((x << s) | (x >> (8 - s)));
}

// The AES S-box, computed (no table to mistype): the inverse in GF(2^8) walked with
// powers of 3, then the affine map.
std::array<std::uint8_t, 256> make_sbox() {
  std::array<std::uint8_t, 256> s{};
  std::uint8_t p = 1, q = 1;
  do {
    p = static_cast<std::uint8_t>(p ^ (p << 1) ^ ((p & 0x80) != 0 ? 0x1B : 0));
    q = static_cast<std::uint8_t>(q ^ (q << 1));
    q = static_cast<std::uint8_t>(q ^ (q << 2));
    q = static_cast<std::uint8_t>(q ^ (q << 4));
    if ((q & 0x80) != 0) q = static_cast<std::uint8_t>(q ^ 0x09);
    const auto x = static_cast<std::uint8_t>(q ^ rotl8(q, 1) ^ rotl8(q, 2) ^ rotl8(q, 3) ^ rotl8(q, 4));
    s[p] = static_cast<std::uint8_t>(x ^ 0x63);
  } while (p != 1);
  s[0] = 0x63;
  return s;
}

const std::array<std::uint8_t, 256> sbox = make_sbox();

// Words hold their four bytes with the first one lowest, so byte order is little-endian.
MEMSHUFFLE_SCAN_RAW std::uint32_t sub_word(std::uint32_t w) noexcept {
  return std::uint32_t{sbox[w & 0xFF]} | std::uint32_t{sbox[(w >> 8) & 0xFF]} << 8 |
         std::uint32_t{sbox[(w >> 16) & 0xFF]} << 16 | std::uint32_t{sbox[w >> 24]} << 24;
}

MEMSHUFFLE_SCAN_RAW std::uint32_t schedule_step(std::uint32_t previous, std::size_t i) noexcept {
  if (i % 8 == 0) return sub_word(std::rotr(previous, 8)) ^ (std::uint32_t{1} << (i / 8 - 1));
  if (i % 8 == 4) return sub_word(previous);
  return previous;
}

enum class layout { bytes, crypto_table, swapped };

MEMSHUFFLE_SCAN_RAW bool word_swapped(layout l, std::size_t i) noexcept {
  return l == layout::swapped || (l == layout::crypto_table && i >= 4 && i < 56);
}

MEMSHUFFLE_SCAN_RAW std::uint32_t word(const std::byte* p, std::size_t i, layout l) noexcept {
  std::uint32_t w;
  std::memcpy(&w, p + 4 * i, 4);
  if constexpr (std::endian::native == std::endian::big) w = __builtin_bswap32(w);
  return word_swapped(l, i) ? __builtin_bswap32(w) : w;
}

MEMSHUFFLE_SCAN_RAW bool schedule_in(const std::byte* p, layout l) noexcept {
  // The cheap first check: word 8 alone rejects almost every offset.
  if ((word(p, 0, l) ^ schedule_step(word(p, 7, l), 8)) != word(p, 8, l)) return false;
  std::array<std::uint32_t, 60> w;  // NOLINT: every word is written before it is read
  for (std::size_t i = 0; i < 8; ++i) w[i] = word(p, i, l);
  for (std::size_t i = 8; i < 60; ++i) {
    w[i] = w[i - 8] ^ schedule_step(w[i - 1], i);
    if (w[i] != word(p, i, l)) return false;
  }
  secure_wipe(w.data(), sizeof w);  // a whole schedule: later scans must not find it here
  return true;
}

std::size_t parse_kb(const std::string& line) {
  const auto colon = line.find(':');
  return colon == std::string::npos ? 0 : std::strtoull(line.c_str() + colon + 1, nullptr, 10) * 1024;
}

bool is_header(const std::string& line) {
  const auto dash = line.find('-');
  const auto space = line.find(' ');
  return dash != std::string::npos && space != std::string::npos && dash < space &&
         line.find(':') > space;
}

mapping parse_header(const std::string& line) {
  mapping m;
  std::istringstream in(line);
  std::string range, offset, device, inode;
  in >> range >> m.perms >> offset >> device >> inode;
  std::getline(in >> std::ws, m.name);
  m.begin = std::stoull(range.substr(0, range.find('-')), nullptr, 16);
  m.end = std::stoull(range.substr(range.find('-') + 1), nullptr, 16);
  return m;
}

// The first occurrence of needle in [p, p + n), or nullptr: memchr for its first byte,
// then a compare.
MEMSHUFFLE_SCAN_RAW const std::byte* find(const std::byte* p, std::size_t n, std::span<const std::byte> needle) {
  const std::size_t m = needle.size();
  for (const std::byte* end = p + n; static_cast<std::size_t>(end - p) >= m;) {
    const void* f = std::memchr(p, std::to_integer<int>(needle[0]), static_cast<std::size_t>(end - p) - m + 1);
    if (f == nullptr) return nullptr;
    p = static_cast<const std::byte*>(f);
    std::size_t k = 1;
    while (k < m && p[k] == needle[k]) ++k;
    if (k == m) return p;
    ++p;
  }
  return nullptr;
}

// Reads exactly n bytes at address a of the own memory, or fails.
bool read_memory(int fd, std::uintptr_t a, std::byte* out, std::size_t n) {
  if (a > static_cast<std::uintptr_t>(INT64_MAX) - n) return false;
  std::size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, out + done, n - done, static_cast<off_t>(a + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    done += static_cast<std::size_t>(r);
  }
  return true;
}

// Reads the own memory with plain loads: secret memory (memfd_secret) cannot be read
// through /proc/self/mem. Not instrumented: it may be poisoned for the sanitizer.
#if defined(__GNUC__)
__attribute__((no_sanitize_address))
#endif
bool read_direct(std::uintptr_t a, std::byte* out, std::size_t n) {
  auto* src = reinterpret_cast<const volatile std::byte*>(a);
  for (std::size_t i = 0; i < n; ++i) out[i] = src[i];
  return true;
}

using range = std::pair<std::uintptr_t, std::uintptr_t>;

// Every live hidden_bytes mapping: never read, even when secret memory is.
std::mutex hidden_lock;
std::vector<range>& hidden_ranges() {
  static std::vector<range> r;
  return r;
}

std::vector<range> without_hidden(const mapping& m) {
  std::vector<range> out{{m.begin, m.end}};
  std::lock_guard lock(hidden_lock);
  for (const range& h : hidden_ranges()) {
    std::vector<range> next;
    for (const range& r : out) {
      if (h.second <= r.first || h.first >= r.second) {
        next.push_back(r);
        continue;
      }
      if (r.first < h.first) next.emplace_back(r.first, h.first);
      if (h.second < r.second) next.emplace_back(h.second, r.second);
    }
    out = std::move(next);
  }
  return out;
}

// The runs of pages of [m.begin, m.end) that are present or swapped out.
std::vector<std::pair<std::uintptr_t, std::uintptr_t>> populated_runs(const mapping& m) {
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> runs;
  const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {{m.begin, m.end}};
  std::vector<std::uint64_t> entries(64 * 1024);
  for (std::uintptr_t a = m.begin; a < m.end;) {
    const std::size_t pages = std::min(entries.size(), (m.end - a) / page);
    const auto want = static_cast<ssize_t>(pages * sizeof(std::uint64_t));
    if (::pread(fd, entries.data(), pages * sizeof(std::uint64_t), static_cast<off_t>(a / page * 8)) != want) {
      runs.emplace_back(a, m.end);  // cannot tell: read it all
      break;
    }
    for (std::size_t k = 0; k < pages; ++k, a += page) {
      if ((entries[k] >> 62) == 0) continue;  // neither present (bit 63) nor swapped (62)
      if (!runs.empty() && runs.back().second == a) runs.back().second += page;
      else runs.emplace_back(a, a + page);
    }
  }
  ::close(fd);
  return runs;
}

}  // namespace

bool mapping::has_flag(std::string_view flag) const {
  std::istringstream in(flags);
  std::string f;
  while (in >> f)
    if (f == flag) return true;
  return false;
}

bool mapping::secret() const {
  // The address and thread sanitizers make mlock a no-op: there, dd alone must do.
  const bool locked = has_flag("lo") || detail::address_sanitizer || detail::thread_sanitizer;
  return name.find("secretmem") != std::string::npos || (dont_dump() && locked);
}

std::string mapping::describe() const {
  char range[64];
  std::snprintf(range, sizeof range, "%zx-%zx", static_cast<std::size_t>(begin), static_cast<std::size_t>(end));
  return std::string(range) + " " + perms + " " + (name.empty() ? "[anonymous]" : name) + " (" +
         std::to_string(size() / 1024) + " KiB; " + flags + ")";
}

std::vector<mapping> read_mappings() {
  std::ifstream in("/proc/self/smaps");
  if (!in) throw std::runtime_error("memory_scan: cannot open /proc/self/smaps");
  std::vector<mapping> out;
  std::string line;
  while (std::getline(in, line)) {
    if (is_header(line)) {
      out.push_back(parse_header(line));
    } else if (!out.empty()) {
      if (line.starts_with("Rss:")) out.back().rss = parse_kb(line);
      else if (line.starts_with("Swap:")) out.back().swap = parse_kb(line);
      else if (line.starts_with("VmFlags:")) out.back().flags = line.substr(9);
    }
  }
  return out;
}

bool in_secret_memory(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  for (const mapping& m : read_mappings())
    if (a >= m.begin && a < m.end) return m.secret();
  return false;
}

hidden_bytes::hidden_bytes(std::size_t n) : n_(n), mapped_((std::max<std::size_t>(n, 1) + page - 1) / page * page) {
  void* p = ::mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  if (::madvise(p, mapped_, MADV_DONTDUMP) != 0) {
    ::munmap(p, mapped_);
    throw std::runtime_error("memory_scan: madvise(MADV_DONTDUMP) failed");
  }
  p_ = static_cast<std::byte*>(p);
  std::lock_guard lock(hidden_lock);
  hidden_ranges().emplace_back(reinterpret_cast<std::uintptr_t>(p), reinterpret_cast<std::uintptr_t>(p) + mapped_);
}

hidden_bytes::~hidden_bytes() {
  {
    std::lock_guard lock(hidden_lock);
    auto& r = hidden_ranges();
    r.erase(std::find(r.begin(), r.end(), range(reinterpret_cast<std::uintptr_t>(p_),
                                                 reinterpret_cast<std::uintptr_t>(p_) + mapped_)));
  }
  secure_wipe(p_, mapped_);
  ::munmap(p_, mapped_);
}

void fill_from_seed(std::span<std::byte> out, std::uint64_t seed) noexcept {
  for (std::size_t i = 0; i < out.size(); i += 8) {
    // splitmix64: every seed gives its own stream, written straight into out.
    std::uint64_t z = (seed += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::memcpy(out.data() + i, &z, std::min<std::size_t>(8, out.size() - i));
  }
}

void expand_aes256_key(std::span<const std::byte> key, std::span<std::byte> out) {
  if (key.size() != 32 || out.size() != schedule_bytes)
    throw std::invalid_argument("expand_aes256_key: 32 bytes of key, 240 bytes of schedule");
  std::array<std::uint32_t, 60> w{};
  for (std::size_t i = 0; i < 8; ++i) w[i] = word(key.data(), i, layout::bytes);
  for (std::size_t i = 8; i < 60; ++i) w[i] = w[i - 8] ^ schedule_step(w[i - 1], i);
  for (std::size_t i = 0; i < 60; ++i)
    for (std::size_t b = 0; b < 4; ++b) out[4 * i + b] = static_cast<std::byte>(w[i] >> (8 * b));
  secure_wipe(w.data(), sizeof w);
}

MEMSHUFFLE_SCAN_RAW bool is_aes256_schedule(const std::byte* p) noexcept {
  return schedule_in(p, layout::bytes) || schedule_in(p, layout::crypto_table) ||
         schedule_in(p, layout::swapped);
}

std::size_t scan_report::count(std::string_view item) const {
  for (const scan_item& i : items)
    if (i.name == item) return i.count;
  throw std::invalid_argument("scan_report: no item " + std::string(item));
}

std::string scan_report::summary() const {
  std::string s;
  for (const scan_item& i : items) s += i.name + ": " + std::to_string(i.count) + "; ";
  char tail[160];
  std::snprintf(tail, sizeof tail, "%zu mappings, %.1f MiB read in %.2f s; %zu secret, %zu other dd, %zu unreadable",
                mappings_read, static_cast<double>(bytes_read) / (1 << 20), seconds, secret.size(),
                skipped_dont_dump, unreadable.size());
  return s + tail;
}

std::string scan_report::where() const {
  std::string s;
  for (const scan_item& i : items)
    for (const hit& h : i.hits) {
      char a[32];
      std::snprintf(a, sizeof a, "0x%zx", static_cast<std::size_t>(h.address));
      s += i.name + " at " + a + " in " + h.where + "\n";
    }
  return s;
}

std::vector<std::string> scan_report::unexpected_unreadable() const {
  std::vector<std::string> out;
  for (const std::string& u : unreadable)
    if (u.find("[vsyscall]") == std::string::npos && u.find("[vvar") == std::string::npos) out.push_back(u);
  return out;
}

memory_scan::memory_scan() : buffer_(chunk + max_needle) {}
memory_scan::~memory_scan() = default;

void memory_scan::add(std::string name, std::span<const std::byte> bytes) {
  if (bytes.empty() || bytes.size() > max_needle) throw std::invalid_argument("memory_scan: needle of 1 to 64 KiB");
  needles_.push_back({std::move(name), bytes});
}

std::size_t memory_scan::overlap() const {
  std::size_t n = schedules_ ? schedule_bytes : 0;
  for (const needle& x : needles_) n = std::max(n, x.bytes.size());
  return (n + 3) / 4 * 4;  // keeps buffer offsets and addresses 4-aligned alike
}

scan_report memory_scan::empty_report() const {
  scan_report r;
  for (const needle& x : needles_) r.items.push_back({x.name, 0, {}});
  if (schedules_) r.items.push_back({std::string(schedule_item), 0, {}});
  return r;
}

// buf[0, carry) was searched with the previous chunk: count only what ends after it.
MEMSHUFFLE_SCAN_RAW void memory_scan::search(const std::byte* buf, std::size_t n, std::size_t carry, std::uintptr_t base,
                         const std::string& where, scan_report& report) const {
  auto record = [&](scan_item& item, std::size_t at) {
    ++item.count;
    // The first few, and the first of every other mapping, so no place goes unnamed.
    const bool new_place = item.hits.empty() || item.hits.back().where != where;
    if (item.hits.size() < 16 || (new_place && item.hits.size() < 64)) item.hits.push_back({base + at, where});
  };
  for (std::size_t k = 0; k < needles_.size(); ++k) {
    const auto& x = needles_[k].bytes;
    for (std::size_t at = 0; at + x.size() <= n;) {
      const std::byte* f = find(buf + at, n - at, x);
      if (f == nullptr) break;
      at = static_cast<std::size_t>(f - buf);
      if (at + x.size() > carry) record(report.items[k], at);
      ++at;
    }
  }
  if (!schedules_) return;
  const std::size_t first = carry >= schedule_bytes ? carry - schedule_bytes + 4 : 0;
  for (std::size_t at = first & ~std::size_t{3}; at + schedule_bytes <= n; at += 4)
    if (at + schedule_bytes > carry && is_aes256_schedule(buf + at)) record(report.items.back(), at);
}

void memory_scan::scan_buffer(std::span<const std::byte> data, std::uintptr_t base, const std::string& where,
                              scan_report& report) const {
  search(data.data(), data.size(), 0, base, where, report);
  report.bytes_read += data.size();
}

// fd < 0: read with plain loads, around the hidden mappings.
void memory_scan::read_mapping(int fd, const mapping& m, scan_report& report) const {
  const std::string where = m.describe();
  const std::size_t keep = overlap();
  std::size_t unreadable = 0, carry = 0;
  // Searches n bytes at a; buffer_[0, carry) holds the bytes just before a.
  auto consume = [&](std::uintptr_t a, std::size_t n) {
    search(buffer_.data(), carry + n, carry, a - carry, where, report);
    report.bytes_read += n;
    const std::size_t next = std::min(keep, carry + n);
    std::memmove(buffer_.data(), buffer_.data() + carry + n - next, next);
    carry = next;
  };
  const auto runs = fd < 0 ? without_hidden(m)
                   : m.size() >= sparse_from && (m.rss + m.swap) * 4 < m.size() ? populated_runs(m)
                                                                                : std::vector<range>{{m.begin, m.end}};
  auto read = [fd](std::uintptr_t a, std::byte* out, std::size_t n) {
    return fd < 0 ? read_direct(a, out, n) : read_memory(fd, a, out, n);
  };
  for (auto [from, to] : runs) {
    carry = 0;
    for (std::uintptr_t a = from; a < to; a += chunk) {
      const std::size_t n = std::min<std::size_t>(chunk, to - a);
      if (read(a, buffer_.data() + carry, n)) {
        consume(a, n);
        continue;
      }
      // Page by page, so one page that cannot be read hides nothing else.
      for (std::uintptr_t p = a; p < a + n; p += page) {
        if (read(p, buffer_.data() + carry, page)) {
          consume(p, page);
        } else {
          unreadable += page;
          carry = 0;
        }
      }
    }
  }
  if (unreadable != 0) report.unreadable.push_back(where + ": " + std::to_string(unreadable / 1024) + " KiB unreadable");
  ++report.mappings_read;
}

scan_report memory_scan::run() const {
  const auto start = std::chrono::steady_clock::now();
  scan_report report = empty_report();
  const int fd = ::open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("memory_scan: cannot open /proc/self/mem");
  for (const mapping& m : read_mappings()) {
    const bool left_out = m.secret() || m.dont_dump();
    // The kernel's own mappings ([vvar]: io, pf) may fault when read with plain loads;
    // the sanitizers' huge shadow mappings stay out too.
    const bool plain = !m.has_flag("io") && !m.has_flag("pf") && m.perms[0] == 'r' && m.size() < sparse_from;
    if (left_out && secret_too_ && plain) {
      read_mapping(-1, m, report);
    } else if (m.secret()) {
      report.secret.push_back(m);
    } else if (m.dont_dump()) {
      ++report.skipped_dont_dump;
    } else if (m.rss + m.swap != 0) {  // nothing in memory: reads as zeros or the file
      read_mapping(fd, m, report);
    }
  }
  ::close(fd);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace memshuffle::testing
