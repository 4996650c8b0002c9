#pragma once
// shuffler: a handle-based, relocating allocator whose entries are encrypted at rest.
// Entries live in arenas over an upstream memory_resource; a lease pins one entry and
// shows it as plaintext; shuffle() moves the unpinned entries to fresh arenas and gives
// emptied arenas back. Every public member may be called from several threads at once.
//
// Errors: invalid_handle_error for an invalid, stale, freed or foreign handle;
// lease_error for a return without a rent and a free of a rented entry; type_error for a
// type larger than the entry or misaligned for it, n == 0 and sizes that overflow;
// integrity_error when the authenticated cipher finds an entry altered. std::bad_alloc
// from the upstream passes through and the shuffler is then exactly as before the call.
#include <cstddef>
#include <limits>
#include <memory>
#include <memory_resource>
#include <span>
#include <type_traits>

#include <memshuffle/cipher.hpp>
#include <memshuffle/error.hpp>
#include <memshuffle/handle.hpp>
#include <memshuffle/lease.hpp>
#include <memshuffle/shuffler_options.hpp>

namespace memshuffle {

namespace detail {
// Frees h now, or when its last lease ends if it is rented; never throws (for sealed<T>).
void free_when_returned(shuffler& owner, handle h) noexcept;

// Entries are moved with memcpy, so only trivially copyable, non-empty object types.
template <class T>
inline constexpr bool storable_v = std::is_object_v<T> && !std::is_array_v<T> &&
                                   std::is_trivially_copyable_v<T> && !std::is_empty_v<T>;
}  // namespace detail

class shuffler {
 public:
  explicit shuffler(shuffler_options options = {},
                    std::pmr::memory_resource* upstream = std::pmr::get_default_resource());
  ~shuffler();  // wipes and releases everything; leases must have ended
  shuffler(const shuffler&) = delete;
  shuffler& operator=(const shuffler&) = delete;

  // n elements of T, reading as zeros. Alignment of T is kept across every move.
  template <class T>
  handle alloc(std::size_t n) {
    static_assert(detail::storable_v<T> && !std::is_const_v<T> && !std::is_volatile_v<T>,
                  "shuffler entries must be non-empty, trivially copyable objects: they move");
    if (n == 0) throw type_error("memshuffle: alloc of zero elements");
    if (n > std::numeric_limits<std::size_t>::max() / sizeof(T))
      throw type_error("memshuffle: alloc size overflows");
    return alloc_bytes(n * sizeof(T), alignof(T));
  }
  template <class T>
  handle create() {
    return alloc<T>(1);
  }

  // The handle is invalid at once; the bytes are wiped and dropped at the next shuffle.
  void free(handle h);

  template <class T>
  lease<T> rent(handle h) {
    static_assert(detail::storable_v<std::remove_cv_t<T>>,
                  "rent needs a non-empty, trivially copyable object type");
    const auto r = rent_bytes(h, sizeof(T), alignof(T));
    return lease<T>(*this, h, static_cast<T*>(r.p), r.bytes / sizeof(T));
  }
  // The explicit form of rent: pair every rent_pointer with one return_pointer.
  template <class P>
  P rent_pointer(handle h) {
    static_assert(std::is_pointer_v<P>, "rent_pointer<P> needs a pointer type");
    using T = std::remove_cv_t<std::remove_pointer_t<P>>;
    if constexpr (std::is_void_v<T>) {
      return static_cast<P>(rent_bytes(h, 1, 1).p);
    } else {
      static_assert(detail::storable_v<T>, "rent_pointer needs a trivially copyable pointee");
      return static_cast<P>(rent_bytes(h, sizeof(T), alignof(T)).p);
    }
  }
  void return_pointer(handle h);

  // Copy an entry out or in without a lease. out.size() / in.size() may be smaller
  // than the entry (a prefix is read or written, the rest is unchanged) but not
  // larger (type_error).
  void read(handle h, std::span<std::byte> out);
  void write(handle h, std::span<const std::byte> in);

  bool valid(handle h) const noexcept;
  std::size_t size_of(handle h) const;  // bytes

  // Drops freed entries, moves every entry not rented into fresh arenas, wipes what
  // they left and gives emptied arenas back to the upstream.
  void shuffle();
  // The same work in steps: moves at most about budget bytes per call (at least one
  // entry) and carries on from there on the next call.
  void shuffle(std::size_t budget);
  void set_shuffle_on_borrow_return(bool on);

  void rotate_key();  // fresh random key and salt
  void rotate_key(const key_type& key, const salt_type& salt);

  shuffler_stats stats() const;

 private:
  struct rented {
    void* p;
    std::size_t bytes;
  };
  struct impl;

  handle alloc_bytes(std::size_t bytes, std::size_t alignment);
  rented rent_bytes(handle h, std::size_t size, std::size_t alignment);

  friend void detail::end_lease(shuffler&, handle) noexcept;
  friend void detail::free_when_returned(shuffler&, handle) noexcept;

  std::unique_ptr<impl> impl_;
};

}  // namespace memshuffle

#include <memshuffle/sealed.hpp>
