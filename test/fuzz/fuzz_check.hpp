#pragma once
// What the fuzz targets share: a check that aborts (so libFuzzer keeps the input) with
// a message, and byte patterns that tell one block's contents from another's.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

namespace memshuffle::fuzz {

[[noreturn]] inline void fail(const char* what, const char* file, int line) {
  std::fprintf(stderr, "model mismatch at %s:%d: %s\n", file, line, what);
  std::abort();
}

#define FUZZ_CHECK(cond) \
  do { if (!(cond)) ::memshuffle::fuzz::fail(#cond, __FILE__, __LINE__); } while (0)

// Byte i of the pattern with this seed; neighbouring seeds give different bytes.
inline std::byte pattern_byte(std::uint32_t seed, std::size_t i) {
  auto x = static_cast<std::uint32_t>(i) * 0x9E3779B1u + seed * 0x85EBCA77u;
  return static_cast<std::byte>((x ^ (x >> 15)) & 0xFF);
}

inline void fill_pattern(std::span<std::byte> bytes, std::uint32_t seed) {
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = pattern_byte(seed, i);
}

inline bool has_pattern(std::span<const std::byte> bytes, std::uint32_t seed) {
  for (std::size_t i = 0; i < bytes.size(); ++i)
    if (bytes[i] != pattern_byte(seed, i)) return false;
  return true;
}

}  // namespace memshuffle::fuzz
