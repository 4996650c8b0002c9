#include <memshuffle/resource_adaptors.hpp>

namespace memshuffle {

boost_resource_adaptor::~boost_resource_adaptor() = default;

void* boost_resource_adaptor::do_allocate(std::size_t bytes, std::size_t alignment) {
  return upstream_->allocate(bytes, alignment);
}

void boost_resource_adaptor::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) {
  upstream_->deallocate(p, bytes, alignment);
}

bool boost_resource_adaptor::do_is_equal(
    const boost::container::pmr::memory_resource& other) const noexcept {
  if (this == &other) return true;
  if (auto* o = dynamic_cast<const boost_resource_adaptor*>(&other))
    return upstream_->is_equal(*o->upstream_);
  // Round trip: over a std_resource_adaptor we are the boost resource it adapts.
  if (auto* s = dynamic_cast<const std_resource_adaptor*>(upstream_))
    return s->upstream_resource()->is_equal(other);
  return false;
}

std_resource_adaptor::~std_resource_adaptor() = default;

void* std_resource_adaptor::do_allocate(std::size_t bytes, std::size_t alignment) {
  return upstream_->allocate(bytes, alignment);
}

void std_resource_adaptor::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) {
  upstream_->deallocate(p, bytes, alignment);
}

bool std_resource_adaptor::do_is_equal(const std::pmr::memory_resource& other) const noexcept {
  if (this == &other) return true;
  if (auto* o = dynamic_cast<const std_resource_adaptor*>(&other))
    return upstream_->is_equal(*o->upstream_);
  if (auto* b = dynamic_cast<const boost_resource_adaptor*>(upstream_))
    return b->upstream_resource()->is_equal(other);
  return false;
}

}  // namespace memshuffle
