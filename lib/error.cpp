#include <memshuffle/error.hpp>

// Out-of-line destructors anchor the vtables (and typeinfo) in the library, so an
// exception thrown by the library is caught by type in any user binary.
namespace memshuffle {
error::~error() = default;
invalid_handle_error::~invalid_handle_error() = default;
lease_error::~lease_error() = default;
type_error::~type_error() = default;
integrity_error::~integrity_error() = default;
fork_error::~fork_error() = default;
bad_alignment::~bad_alignment() = default;
const char* bad_alignment::what() const noexcept {
  return "memshuffle: alignment is not a power of two, or is larger than the resource supports";
}
}  // namespace memshuffle
