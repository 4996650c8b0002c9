#pragma once
// Reads the vector registers into memory, for tests that check what a call leaves in
// them. A macro, so that nothing runs between the call under test and the read.
#include <array>
#include <cstddef>

namespace memshuffle::testing {

struct vector_register_file {
  std::array<std::array<std::byte, 16>, 32> reg{};
  std::size_t count = 0;
};

#if defined(__x86_64__)
inline constexpr bool vector_registers_readable = true;

inline bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

// xmm0-15 always; xmm16-31 where AVX-512 exists (glibc's string functions use them).
#define MEMSHUFFLE_READ_VECTOR_REGISTERS(file)                                                \
  do {                                                                                       \
    ::memshuffle::testing::vector_register_file& f_ = (file);                                \
    asm volatile(                                                                            \
        "movdqu %%xmm0, 0(%0)\n\tmovdqu %%xmm1, 16(%0)\n\tmovdqu %%xmm2, 32(%0)\n\t"        \
        "movdqu %%xmm3, 48(%0)\n\tmovdqu %%xmm4, 64(%0)\n\tmovdqu %%xmm5, 80(%0)\n\t"       \
        "movdqu %%xmm6, 96(%0)\n\tmovdqu %%xmm7, 112(%0)\n\tmovdqu %%xmm8, 128(%0)\n\t"     \
        "movdqu %%xmm9, 144(%0)\n\tmovdqu %%xmm10, 160(%0)\n\tmovdqu %%xmm11, 176(%0)\n\t"  \
        "movdqu %%xmm12, 192(%0)\n\tmovdqu %%xmm13, 208(%0)\n\tmovdqu %%xmm14, 224(%0)\n\t" \
        "movdqu %%xmm15, 240(%0)"                                                            \
        :                                                                                    \
        : "r"(f_.reg.data())                                                                 \
        : "memory");                                                                         \
    f_.count = 16;                                                                           \
    if (::memshuffle::testing::has_avx512()) {                                               \
      asm volatile(                                                                          \
          "vmovdqu64 %%xmm16, 256(%0)\n\tvmovdqu64 %%xmm17, 272(%0)\n\t"                     \
          "vmovdqu64 %%xmm18, 288(%0)\n\tvmovdqu64 %%xmm19, 304(%0)\n\t"                     \
          "vmovdqu64 %%xmm20, 320(%0)\n\tvmovdqu64 %%xmm21, 336(%0)\n\t"                     \
          "vmovdqu64 %%xmm22, 352(%0)\n\tvmovdqu64 %%xmm23, 368(%0)\n\t"                     \
          "vmovdqu64 %%xmm24, 384(%0)\n\tvmovdqu64 %%xmm25, 400(%0)\n\t"                     \
          "vmovdqu64 %%xmm26, 416(%0)\n\tvmovdqu64 %%xmm27, 432(%0)\n\t"                     \
          "vmovdqu64 %%xmm28, 448(%0)\n\tvmovdqu64 %%xmm29, 464(%0)\n\t"                     \
          "vmovdqu64 %%xmm30, 480(%0)\n\tvmovdqu64 %%xmm31, 496(%0)"                         \
          :                                                                                  \
          : "r"(f_.reg.data())                                                               \
          : "memory");                                                                       \
      f_.count = 32;                                                                         \
    }                                                                                        \
  } while (false)
#else
inline constexpr bool vector_registers_readable = false;
#define MEMSHUFFLE_READ_VECTOR_REGISTERS(file) ((void)(file))
#endif

}  // namespace memshuffle::testing
