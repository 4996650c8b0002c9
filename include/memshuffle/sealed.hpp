#pragma once
// sealed<T>: owns one entry of a shuffler and frees it when it ends, like a
// unique_ptr for shuffler entries. open() rents it.
#include <cstddef>
#include <utility>

#include <memshuffle/shuffler.hpp>

namespace memshuffle {

/// Owns one entry of a shuffler and frees it when it ends, like a unique_ptr.
template <class T>
class sealed {
 public:
  /// \effects Allocates one T in owner, reading as zeros.
  /// \throws As shuffler::create.
  explicit sealed(shuffler& owner) : owner_(&owner), id_(owner.create<T>()) {}
  /// \effects Allocates n elements of T in owner, reading as zeros.
  /// \throws As shuffler::alloc.
  sealed(shuffler& owner, std::size_t n) : owner_(&owner), id_(owner.alloc<T>(n)) {}
  /// \requires id names an entry of owner that nothing else frees.
  /// \returns A sealed that owns that entry.
  static sealed adopt(shuffler& owner, handle id) { return sealed(&owner, id); }

  /// \effects Takes over other's entry; other is empty afterwards.
  sealed(sealed&& other) noexcept
      : owner_(std::exchange(other.owner_, nullptr)), id_(std::exchange(other.id_, invalid_handle)) {}
  /// \effects Frees the entry held (as reset()), then takes over other's.
  /// \returns *this.
  sealed& operator=(sealed&& other) noexcept {
    if (this != &other) {
      reset();
      owner_ = std::exchange(other.owner_, nullptr);
      id_ = std::exchange(other.id_, invalid_handle);
    }
    return *this;
  }
  sealed(const sealed&) = delete;
  sealed& operator=(const sealed&) = delete;
  /// \effects reset().
  ~sealed() { reset(); }

  /// \requires The sealed is not empty.
  /// \returns A lease on the entry (shuffler::rent).
  /// \throws As shuffler::rent.
  lease<T> open() const { return owner_->template rent<T>(id_); }
  /// \returns The entry's handle (invalid_handle when empty).
  handle id() const noexcept { return id_; }
  /// \returns Whether the sealed owns an entry.
  explicit operator bool() const noexcept { return owner_ != nullptr; }

  /// \effects Gives up ownership without freeing; the caller now owns the entry.
  /// \returns Its handle.
  handle release() noexcept {
    owner_ = nullptr;
    return std::exchange(id_, invalid_handle);
  }
  /// \effects Frees the entry now (or, while a lease on it is open, when the last
  ///   lease ends); the sealed is empty afterwards. Never throws.
  void reset() noexcept {
    if (owner_ != nullptr) detail::free_when_returned(*std::exchange(owner_, nullptr), id_);
    id_ = invalid_handle;
  }

 private:
  sealed(shuffler* owner, handle id) noexcept : owner_(owner), id_(id) {}

  shuffler* owner_ = nullptr;
  handle id_ = invalid_handle;
};

}  // namespace memshuffle
