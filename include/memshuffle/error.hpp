#pragma once
// The exceptions memshuffle throws. std::bad_alloc from an upstream resource is
// passed through unchanged and is not wrapped in these.
#include <new>
#include <stdexcept>
#include <string>

namespace memshuffle {

/// The base of every exception memshuffle throws itself.
class error : public std::runtime_error {
 public:
  /// \effects As std::runtime_error's constructors.
  using std::runtime_error::runtime_error;
  ~error() override;
};

/// An invalid, unknown, stale or freed handle, or one from another shuffler.
class invalid_handle_error : public error {
 public:
  /// \effects As error's constructors.
  using error::error;
  ~invalid_handle_error() override;
};

/// A return without a rent, or a free of a rented entry.
class lease_error : public error {
 public:
  /// \effects As error's constructors.
  using error::error;
  ~lease_error() override;
};

/// A type larger than the entry or misaligned for it, or n == 0.
class type_error : public error {
 public:
  /// \effects As error's constructors.
  using error::error;
  ~type_error() override;
};

/// An authenticated cipher found the ciphertext altered.
class integrity_error : public error {
 public:
  /// \effects As error's constructors.
  using error::error;
  ~integrity_error() override;
};

/// A call in a child process made by fork() on an object of the parent that holds keys
/// or secret memory: the child never encrypts under the parent's key and counter.
class fork_error : public error {
 public:
  /// \effects As error's constructors.
  using error::error;
  ~fork_error() override;
};

/// An alignment that is not a power of two (or, for the page-granular resources for
/// secrets, one above the page size) given to a memshuffle resource's allocate().
/// A std::bad_alloc, as the standard's new_delete_resource throws for one, so code
/// written for std resources handles it the same way; it says what was wrong.
class bad_alignment : public std::bad_alloc {
 public:
  /// \returns A message naming the problem.
  const char* what() const noexcept override;
  ~bad_alignment() override;
};

}  // namespace memshuffle
