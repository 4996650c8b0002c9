#include "secret_memory.hpp"

#include <memshuffle/secure_page_resource.hpp>

#include <new>

namespace memshuffle::detail {

std::pmr::memory_resource* secret_memory() noexcept {
  // Constructed in place and never destroyed (as std::pmr::new_delete_resource()).
  alignas(secure_page_resource) static unsigned char storage[sizeof(secure_page_resource)];
  static secure_page_resource* const resource = ::new (storage) secure_page_resource();
  return resource;
}

}  // namespace memshuffle::detail
