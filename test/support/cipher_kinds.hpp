#pragma once
// The cipher kinds the suites loop over: every kind, and the ones that encrypt.
#include <memshuffle/cipher.hpp>

#include <array>

namespace memshuffle::testing {

inline constexpr std::array all_ciphers{cipher_kind::none, cipher_kind::aes_256_ctr,
                                        cipher_kind::aes_256_gcm};
inline constexpr std::array encrypting_ciphers{cipher_kind::aes_256_ctr, cipher_kind::aes_256_gcm};

}  // namespace memshuffle::testing
