#pragma once
// Bridges between the two polymorphic-resource families, so any std::pmr resource
// (every memshuffle resource among them) serves boost::container::pmr containers, and
// any boost one serves std::pmr containers. Both pass size and alignment through
// unchanged: an alignment of 4096 reaches the underlying resource as 4096 (boost's
// own monotonic_buffer_resource rejects anything above max_align_t, boostorg/container#107).
//
// An adaptor does not own what it adapts; the adapted resource must outlive it.
#include <boost/container/pmr/memory_resource.hpp>
#include <memory_resource>

namespace memshuffle {

/// A boost::container::pmr::memory_resource over a std::pmr::memory_resource.
class boost_resource_adaptor : public boost::container::pmr::memory_resource {
 public:
  /// \effects An adaptor over `upstream`, which it does not own.
  /// \requires `upstream` is not null and outlives the adaptor.
  explicit boost_resource_adaptor(
      std::pmr::memory_resource* upstream = std::pmr::get_default_resource()) noexcept
      : upstream_(upstream) {}
  /// \effects An adaptor over the same upstream as `other`.
  boost_resource_adaptor(const boost_resource_adaptor& other) = default;
  /// \effects Adapts the same upstream as `other`.
  /// \returns `*this`.
  boost_resource_adaptor& operator=(const boost_resource_adaptor& other) = default;
  ~boost_resource_adaptor() override;

  /// \returns The std resource adapted.
  std::pmr::memory_resource* upstream_resource() const noexcept { return upstream_; }

 protected:
  /// \returns upstream_resource()->allocate(bytes, alignment).
  /// \throws Whatever the upstream throws (a memshuffle resource: bad_alignment for an
  /// alignment it cannot serve, e.g. one that is not a power of two).
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  /// \effects upstream_resource()->deallocate(p, bytes, alignment).
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override;
  /// \returns Whether the resources underneath are equal (memory from one can be
  /// freed through the other), also across a round trip through std_resource_adaptor.
  bool do_is_equal(const boost::container::pmr::memory_resource& other) const noexcept override;

 private:
  std::pmr::memory_resource* upstream_;
};

/// A std::pmr::memory_resource over a boost::container::pmr::memory_resource.
class std_resource_adaptor : public std::pmr::memory_resource {
 public:
  /// \effects An adaptor over `upstream`, which it does not own.
  /// \requires `upstream` is not null and outlives the adaptor.
  explicit std_resource_adaptor(boost::container::pmr::memory_resource* upstream) noexcept
      : upstream_(upstream) {}
  /// \effects An adaptor over the same upstream as `other`.
  std_resource_adaptor(const std_resource_adaptor& other) = default;
  /// \effects Adapts the same upstream as `other`.
  /// \returns `*this`.
  std_resource_adaptor& operator=(const std_resource_adaptor& other) = default;
  ~std_resource_adaptor() override;

  /// \returns The boost resource adapted.
  boost::container::pmr::memory_resource* upstream_resource() const noexcept { return upstream_; }

 protected:
  /// \returns upstream_resource()->allocate(bytes, alignment).
  /// \throws Whatever the upstream throws.
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  /// \effects upstream_resource()->deallocate(p, bytes, alignment).
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override;
  /// \returns Whether memory from one can be freed through the other (see above).
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override;

 private:
  boost::container::pmr::memory_resource* upstream_;
};

}  // namespace memshuffle
