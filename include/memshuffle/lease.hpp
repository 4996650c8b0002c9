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

template <class T>
class lease {
 public:
  using element_type = T;

  lease() noexcept = default;
  lease(lease&& other) noexcept
      : owner_(std::exchange(other.owner_, nullptr)),
        id_(other.id_),
        p_(std::exchange(other.p_, nullptr)),
        n_(std::exchange(other.n_, 0)) {}
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
  ~lease() { reset(); }

  // Ends this lease now; the lease is empty afterwards.
  void reset() noexcept {
    if (owner_ != nullptr) detail::end_lease(*std::exchange(owner_, nullptr), id_);
    p_ = nullptr;
    n_ = 0;
  }

  T* get() const noexcept { return p_; }
  T& operator*() const noexcept { return *p_; }
  T* operator->() const noexcept { return p_; }
  // All size_of(h) / sizeof(T) elements of the entry.
  std::span<T> span() const noexcept { return {p_, n_}; }
  std::size_t size() const noexcept { return n_; }
  handle id() const noexcept { return id_; }
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
