// Built with clang++ -stdlib=libc++ (test/meson.build, when a libc++ with
// <memory_resource> is found): prints the trace of libc++'s monotonic_buffer_resource
// for `seed buffer_size initial`, which test/arena_resource_std.cpp compares with
// arena_resource's.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <memory_resource>

#include "test/support/monotonic_trace.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s seed buffer_size initial\n", argv[0]);
    return 2;
  }
  const memshuffle::testing::trace_config c{std::strtoull(argv[1], nullptr, 10),
                                            std::strtoull(argv[2], nullptr, 10),
                                            std::strtoull(argv[3], nullptr, 10)};
  memshuffle::testing::monotonic_tracer tracer;
  const auto trace = tracer.run(c, [](void* buffer, std::size_t size, std::size_t initial,
                                      std::pmr::memory_resource* up) {
    using mono = std::pmr::monotonic_buffer_resource;
    return buffer ? std::make_unique<mono>(buffer, size, up) : std::make_unique<mono>(initial, up);
  });
  std::fputs(trace.c_str(), stdout);
}
