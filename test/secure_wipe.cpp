// secure_wipe: the one way memshuffle clears memory that held a secret.
#include <doctest/doctest.h>

#include <memshuffle/secure_wipe.hpp>

#include <algorithm>
#include <cstddef>
#include <vector>

using bytes = std::vector<std::byte>;

TEST_SUITE("crypto") {

TEST_CASE("secure_wipe zeroes exactly the bytes it is given") {
  bytes data(40, std::byte{0xAB});
  memshuffle::secure_wipe(data.data() + 4, 32);
  CHECK(std::all_of(data.begin() + 4, data.begin() + 36, [](std::byte b) { return b == std::byte{0}; }));
  CHECK(data[3] == std::byte{0xAB});
  CHECK(data[36] == std::byte{0xAB});
  memshuffle::secure_wipe(nullptr, 0);
}

}  // TEST_SUITE("crypto")
