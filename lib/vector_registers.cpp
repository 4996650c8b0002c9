#include "vector_registers.hpp"

namespace memshuffle::detail {

#if defined(__x86_64__)

namespace {

__attribute__((target("avx"))) void clear_avx() noexcept {
  asm volatile("vzeroall" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
               "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

void clear_sse() noexcept {
  asm volatile(
      "pxor %%xmm0, %%xmm0\n\tpxor %%xmm1, %%xmm1\n\tpxor %%xmm2, %%xmm2\n\t"
      "pxor %%xmm3, %%xmm3\n\tpxor %%xmm4, %%xmm4\n\tpxor %%xmm5, %%xmm5\n\t"
      "pxor %%xmm6, %%xmm6\n\tpxor %%xmm7, %%xmm7\n\tpxor %%xmm8, %%xmm8\n\t"
      "pxor %%xmm9, %%xmm9\n\tpxor %%xmm10, %%xmm10\n\tpxor %%xmm11, %%xmm11\n\t"
      "pxor %%xmm12, %%xmm12\n\tpxor %%xmm13, %%xmm13\n\tpxor %%xmm14, %%xmm14\n\t"
      "pxor %%xmm15, %%xmm15" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
      "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

// Zeroes register r16..r31 ("xmm" or "zmm") with EVEX vpxord.
#define MEMSHUFFLE_ZERO(r, n) "vpxord %%" r #n ", %%" r #n ", %%" r #n "\n\t"
#define MEMSHUFFLE_ZERO_16_31(r)                                                           \
  MEMSHUFFLE_ZERO(r, 16) MEMSHUFFLE_ZERO(r, 17) MEMSHUFFLE_ZERO(r, 18) MEMSHUFFLE_ZERO(r, 19) \
  MEMSHUFFLE_ZERO(r, 20) MEMSHUFFLE_ZERO(r, 21) MEMSHUFFLE_ZERO(r, 22) MEMSHUFFLE_ZERO(r, 23) \
  MEMSHUFFLE_ZERO(r, 24) MEMSHUFFLE_ZERO(r, 25) MEMSHUFFLE_ZERO(r, 26) MEMSHUFFLE_ZERO(r, 27) \
  MEMSHUFFLE_ZERO(r, 28) MEMSHUFFLE_ZERO(r, 29) MEMSHUFFLE_ZERO(r, 30) MEMSHUFFLE_ZERO(r, 31)
#define MEMSHUFFLE_CLOBBERS_16_31                                                           \
  "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", \
      "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"

// glibc's EVEX string functions (memcpy, memset) use ymm16-31, which vzeroall leaves.
// The 128-bit EVEX form zeroes the whole zmm register without a 512-bit operation
// (which would cost a change of the core's frequency licence).
__attribute__((target("avx512f,avx512vl"))) void clear_avx512_upper() noexcept {
  asm volatile(MEMSHUFFLE_ZERO_16_31("xmm") ::: MEMSHUFFLE_CLOBBERS_16_31);
}

// Without AVX512VL (the first Xeon Phi) only the 512-bit form exists.
__attribute__((target("avx512f"))) void clear_avx512_upper_wide() noexcept {
  asm volatile(MEMSHUFFLE_ZERO_16_31("zmm") ::: MEMSHUFFLE_CLOBBERS_16_31);
}

struct features {
  bool avx, avx512f, avx512vl;
};

// __builtin_cpu_supports("avx") also checks that the kernel saves the ymm state.
const features& cpu() noexcept {
  static const features f = [] {
    __builtin_cpu_init();
    return features{__builtin_cpu_supports("avx") != 0, __builtin_cpu_supports("avx512f") != 0,
                    __builtin_cpu_supports("avx512vl") != 0};
  }();
  return f;
}

}  // namespace

void clear_vector_registers() noexcept {
  const features& f = cpu();
  if (f.avx512vl)
    clear_avx512_upper();
  else if (f.avx512f)
    clear_avx512_upper_wide();
  if (f.avx)
    clear_avx();
  else
    clear_sse();
}

#elif defined(__aarch64__)

void clear_vector_registers() noexcept {
  asm volatile(
      "movi v0.16b, #0\n\tmovi v1.16b, #0\n\tmovi v2.16b, #0\n\tmovi v3.16b, #0\n\t"
      "movi v4.16b, #0\n\tmovi v5.16b, #0\n\tmovi v6.16b, #0\n\tmovi v7.16b, #0\n\t"
      "movi v8.16b, #0\n\tmovi v9.16b, #0\n\tmovi v10.16b, #0\n\tmovi v11.16b, #0\n\t"
      "movi v12.16b, #0\n\tmovi v13.16b, #0\n\tmovi v14.16b, #0\n\tmovi v15.16b, #0\n\t"
      "movi v16.16b, #0\n\tmovi v17.16b, #0\n\tmovi v18.16b, #0\n\tmovi v19.16b, #0\n\t"
      "movi v20.16b, #0\n\tmovi v21.16b, #0\n\tmovi v22.16b, #0\n\tmovi v23.16b, #0\n\t"
      "movi v24.16b, #0\n\tmovi v25.16b, #0\n\tmovi v26.16b, #0\n\tmovi v27.16b, #0\n\t"
      "movi v28.16b, #0\n\tmovi v29.16b, #0\n\tmovi v30.16b, #0\n\tmovi v31.16b, #0" :::
      "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10", "v11", "v12", "v13",
      "v14", "v15", "v16", "v17", "v18", "v19", "v20", "v21", "v22", "v23", "v24", "v25",
      "v26", "v27", "v28", "v29", "v30", "v31");
}

#else

// No clearing is implemented for this architecture (docs/security.md says so).
void clear_vector_registers() noexcept {}

#endif

}  // namespace memshuffle::detail
