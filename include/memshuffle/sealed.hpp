#pragma once
// sealed<T>: owns one entry of a shuffler and frees it when it ends, like a
// unique_ptr for shuffler entries. open() rents it.
#include <cstddef>
#include <utility>

#include <memshuffle/shuffler.hpp>

namespace memshuffle {

template <class T>
class sealed {
 public:
  // One T, reading as zeros.
  explicit sealed(shuffler& owner) : owner_(&owner), id_(owner.create<T>()) {}
  // n elements of T, reading as zeros.
  sealed(shuffler& owner, std::size_t n) : owner_(&owner), id_(owner.alloc<T>(n)) {}
  // Takes over an entry already allocated in owner.
  static sealed adopt(shuffler& owner, handle id) { return sealed(&owner, id); }

  sealed(sealed&& other) noexcept
      : owner_(std::exchange(other.owner_, nullptr)), id_(std::exchange(other.id_, invalid_handle)) {}
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
  ~sealed() { reset(); }

  lease<T> open() const { return owner_->template rent<T>(id_); }
  handle id() const noexcept { return id_; }
  explicit operator bool() const noexcept { return owner_ != nullptr; }

  // Gives up ownership without freeing; the caller now owns the entry.
  handle release() noexcept {
    owner_ = nullptr;
    return std::exchange(id_, invalid_handle);
  }
  // Frees the entry now (or, while a lease on it is open, when the last lease ends).
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
