#pragma once
// lease<T>: the RAII rent of one entry. While any lease on an entry is open the entry
// is pinned (never moved) and readable as plaintext; leases on one entry nest, and the
// last one to end returns the entry (which encrypts it again). Ending a lease never
// throws: it runs in destructors.
#include <cstddef>
#include <span>
#include <utility>

#include <memshuffle/handle.hpp>

namespace memshuffle {

class shuffler;

namespace detail {
// Ends one lease on h; defined in the library, never throws.
void end_lease(shuffler& owner, handle h) noexcept;
}  // namespace detail

/// The RAII rent of one entry of a shuffler: the entry stays pinned and readable as
/// plaintext until the lease ends. Made by shuffler::rent and sealed<T>::open.
template <class T>
class lease {
 public:
  /// The type of the entry's elements.
  using element_type = T;

  /// \effects An empty lease, holding no entry.
  lease() noexcept = default;
  /// \effects Takes over other's rent; other is empty afterwards.
  lease(lease&& other) noexcept
      : owner_(std::exchange(other.owner_, nullptr)),
        id_(other.id_),
        p_(std::exchange(other.p_, nullptr)),
        n_(std::exchange(other.n_, 0)) {}
  /// \effects Ends this lease's rent (as reset()), then takes over other's.
  /// \returns *this.
  lease& operator=(lease&& other) noexcept {
    if (this != &other) {
      reset();
      owner_ = std::exchange(other.owner_, nullptr);
      id_ = other.id_;
      p_ = std::exchange(other.p_, nullptr);
      n_ = std::exchange(other.n_, 0);
    }
    return *this;
  }
  lease(const lease&) = delete;
  lease& operator=(const lease&) = delete;
  /// \effects reset().
  ~lease() { reset(); }

  /// \effects Ends this lease now (the last lease on the entry returns it, which
  ///   encrypts it again); the lease is empty afterwards. Never throws.
  void reset() noexcept {
    if (owner_ != nullptr) detail::end_lease(*std::exchange(owner_, nullptr), id_);
    p_ = nullptr;
    n_ = 0;
  }

  /// \returns The first element of the entry's plaintext; null when empty.
  T* get() const noexcept { return p_; }
  /// \requires The lease is not empty.
  /// \returns The first element.
  T& operator*() const noexcept { return *p_; }
  /// \requires The lease is not empty.
  /// \returns get().
  T* operator->() const noexcept { return p_; }
  /// \returns All size_of(h) / sizeof(T) elements of the entry.
  std::span<T> span() const noexcept { return {p_, n_}; }
  /// \returns The number of elements (0 when empty).
  std::size_t size() const noexcept { return n_; }
  /// \returns The handle of the rented entry.
  handle id() const noexcept { return id_; }
  /// \returns Whether the lease holds a rent.
  explicit operator bool() const noexcept { return owner_ != nullptr; }

 private:
  friend class shuffler;
  lease(shuffler& owner, handle id, T* p, std::size_t n) noexcept
      : owner_(&owner), id_(id), p_(p), n_(n) {}

  shuffler* owner_ = nullptr;
  handle id_ = invalid_handle;
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace memshuffle
