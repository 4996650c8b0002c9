#include "secret_memory.hpp"

#include <memshuffle/secret_pool_resource.hpp>

namespace memshuffle::detail {

std::pmr::memory_resource* secret_memory() noexcept { return &default_secret_pool(); }

}  // namespace memshuffle::detail
