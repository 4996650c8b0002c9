// os_random: the operating system's generator behind every key and salt.
#include <doctest/doctest.h>

#include <memshuffle/os_random.hpp>

#include <cstddef>
#include <vector>

using bytes = std::vector<std::byte>;

TEST_SUITE("crypto") {

TEST_CASE("os_random fills the whole buffer with fresh bytes each time") {
  bytes a(64), b(64);
  memshuffle::os_random(a);
  memshuffle::os_random(b);
  CHECK(a != b);                        // equal with probability 2^-512
  CHECK(a != bytes(64));
  // The last byte is written too: 16 draws all leaving it zero has probability 2^-128.
  bool last_written = false;
  for (int i = 0; i < 16 && !last_written; ++i) {
    bytes c(33);
    memshuffle::os_random(c);
    last_written = c.back() != std::byte{0};
  }
  CHECK(last_written);
}

}  // TEST_SUITE("crypto")
