#pragma once
// shuffler: a handle-based, relocating allocator whose entries are encrypted at rest.
// Entries live in arenas over an upstream memory_resource; a lease pins one entry and
// shows it as plaintext; shuffle() moves the unpinned entries to fresh arenas and gives
// emptied arenas back. Every public member may be called from several threads at once;
// the shuffler is split in shards (shuffler_options::shards) so that threads using
// their own entries do not wait for each other.
//
// Errors: invalid_handle_error for an invalid, stale, freed or foreign handle;
// lease_error for a return without a rent and a free of a rented entry; type_error for a
// type larger than the entry or misaligned for it, n == 0 and sizes that overflow;
// integrity_error when the authenticated cipher finds an entry altered; fork_error for
// any call in a child of fork(). std::bad_alloc from the upstream passes through and
// the shuffler is then exactly as before the call.
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

// Sets the ordinal of the calling thread: its allocations go to shard ordinal %
// shuffler_options::shards of any shuffler. Every thread otherwise takes one on its
// first allocation, the lowest no live thread holds, and gives it back when it ends;
// tests and the fuzzer set it to place entries at will. The ordinal the thread had
// taken is given back now; one set here is never given back, nor kept from others.
void set_thread_ordinal(std::size_t ordinal) noexcept;

// Test hooks that interleave a full shuffle and a key rotation from one thread.
// Runs the next part of the full shuffle of h's shard, beginning one if none is under
// way; returns whether parts remain (shuffle() on that shard waits until none do).
bool full_shuffle_part(shuffler& owner, handle h);
// f(context) runs in every batch of a key rotation, once the batch's entries are marked
// sealing and the shard's lock is released, before they are re-encrypted; null: none.
void set_rotation_batch_hook(void (*f)(void*), void* context) noexcept;

// Entries are moved with memcpy, so only trivially copyable, non-empty object types.
template <class T>
inline constexpr bool storable_v = std::is_object_v<T> && !std::is_array_v<T> &&
                                   std::is_trivially_copyable_v<T> && !std::is_empty_v<T>;
}  // namespace detail

/// A handle-based, relocating allocator whose entries are encrypted at rest. In a child
/// of fork() every member but valid() and the destructor throws fork_error: the child
/// never encrypts under the parent's key and counter.
class shuffler {
 public:
  /// \effects Makes an empty shuffler whose arenas come from upstream, keyed with
  ///   options.key and options.salt (random ones when absent); the caller's key and
  ///   salt in options are wiped once they are in the library's secret memory.
  /// \throws std::invalid_argument for a null upstream, arena_size 0, a negative or
  ///   infinite shuffle_above_ratio, an unknown cipher_kind, or plaintext_in_place
  ///   together with a plaintext_resource; memshuffle::error when every handle tag of
  ///   the process is in use; std::bad_alloc.
  explicit shuffler(shuffler_options options = {},
                    std::pmr::memory_resource* upstream = std::pmr::get_default_resource());
  /// \effects Wipes every entry, window and key, and gives all memory back.
  /// \requires No lease is open. In a child of fork() it touches nothing: the memory
  ///   is the parent's image, and stays as it is until the child exits.
  ~shuffler();
  shuffler(const shuffler&) = delete;
  shuffler& operator=(const shuffler&) = delete;

  /// \effects Allocates an entry of n elements of T, reading as zeros; its alignment
  ///   is kept across every move.
  /// \returns The entry's handle, valid in this shuffler only.
  /// \throws type_error when n == 0 or n * sizeof(T) overflows or is too large;
  ///   std::bad_alloc (nothing changed).
  template <class T>
  handle alloc(std::size_t n) {
    static_assert(detail::storable_v<T> && !std::is_const_v<T> && !std::is_volatile_v<T>,
                  "shuffler entries must be non-empty, trivially copyable objects: they move");
    if (n == 0) throw type_error("memshuffle: alloc of zero elements");
    if (n > std::numeric_limits<std::size_t>::max() / sizeof(T))
      throw type_error("memshuffle: alloc size overflows");
    return alloc_bytes(n * sizeof(T), alignof(T));
  }
  /// \effects alloc<T>(1).
  /// \returns The entry's handle.
  /// \throws As alloc.
  template <class T>
  handle create() {
    return alloc<T>(1);
  }

  /// \effects The handle is invalid at once; the bytes are wiped and dropped at the
  ///   next shuffle.
  /// \throws invalid_handle_error; lease_error when the entry is rented.
  void free(handle h);

  /// \effects Pins the entry and shows it as plaintext (decrypting it on its first
  ///   lease) until the lease ends.
  /// \returns A lease on all size_of(h) / sizeof(T) elements.
  /// \throws invalid_handle_error; type_error when T is larger than the entry or more
  ///   strictly aligned; lease_error after 65,535 leases open on one entry;
  ///   integrity_error when the ciphertext was altered; std::bad_alloc for the
  ///   plaintext window (the entry is then as it was).
  template <class T>
  lease<T> rent(handle h) {
    static_assert(detail::storable_v<std::remove_cv_t<T>>,
                  "rent needs a non-empty, trivially copyable object type");
    const auto r = rent_bytes(h, sizeof(T), alignof(T));
    return lease<T>(*this, h, static_cast<T*>(r.p), r.bytes / sizeof(T));
  }
  /// \effects As rent, without the RAII: pair every rent_pointer with one return_pointer.
  /// \returns The plaintext of the entry, as P (P a pointer type).
  /// \throws As rent.
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
  /// \effects Ends one rent of h; the last one encrypts the entry again, wipes its
  ///   plaintext window and, with shuffle on return, moves it.
  /// \throws invalid_handle_error; lease_error when h is not rented; std::bad_alloc
  ///   when the cipher ran out of memory (the entry then stays rented-open until its
  ///   next return).
  void return_pointer(handle h);

  /// \effects Copies the first out.size() bytes of the entry to out, without a lease.
  /// \throws As rent; type_error when out is larger than the entry.
  void read(handle h, std::span<std::byte> out);
  /// \effects Copies in to the first in.size() bytes of the entry (the rest is
  ///   unchanged), without a lease.
  /// \throws As rent; type_error when in is larger than the entry.
  void write(handle h, std::span<const std::byte> in);

  /// \returns Whether h names a live entry of this shuffler (false in a child of fork()).
  bool valid(handle h) const noexcept;
  /// \returns The entry's size in bytes.
  /// \throws invalid_handle_error.
  std::size_t size_of(handle h) const;

  /// \effects Drops freed entries, moves every entry not rented into fresh arenas,
  ///   wipes what they left and gives emptied arenas back to the upstream. Works in
  ///   parts of bounded length and lets other threads in between them: an entry that
  ///   is rented when its turn comes stays where it is (one rented earlier and returned
  ///   by then moves), and entries they allocate are not moved. With several shards
  ///   (shuffler_options::shards) the shards are shuffled one after another. Once
  ///   entries have moved, an entry that finds no memory stays where it is too. A
  ///   second call meanwhile waits for the first to end.
  /// \throws std::bad_alloc before any entry of a shard moved: that shard and the
  ///   ones after it unchanged, the ones before it shuffled.
  void shuffle();
  /// \effects The same work in steps: moves at most about budget bytes and carries on
  ///   from there on the next call. A call's work follows its budget, not the heap's
  ///   size: a slot it looks at without moving anything counts as 16 bytes, and the
  ///   first slot it looks at is moved whatever its size. Does nothing while a full
  ///   shuffle runs on another thread. A pass visits the entries at random, so its
  ///   arenas empty near its end: the upstream lends up to about the heap's size again
  ///   meanwhile (the full shuffle() needs two arenas).
  /// \throws std::bad_alloc (nothing changed by this step).
  void shuffle(std::size_t budget);
  /// \effects Turns shuffle on return (shuffler_options::shuffle_on_return) on or off.
  void set_shuffle_on_return(bool on);

  /// \effects A fresh random key and salt become current, and every entry at rest is
  ///   re-encrypted under them, a batch at a time.
  /// \throws std::bad_alloc (every entry stays readable, under the key it is under).
  void rotate_key();
  /// \effects As rotate_key(), with the given key and salt.
  /// \throws As rotate_key().
  void rotate_key(const key_type& key, const salt_type& salt);

  /// \returns The statistics, all taken at one moment.
  shuffler_stats stats() const;

 private:
  struct rented {
    void* p;
    std::size_t bytes;
  };
  struct impl;
  struct synchronized;
  struct shard_set;

  handle alloc_bytes(std::size_t bytes, std::size_t alignment);
  rented rent_bytes(handle h, std::size_t size, std::size_t alignment);

  friend void detail::free_when_returned(shuffler&, handle) noexcept;
  friend bool detail::full_shuffle_part(shuffler&, handle);

  std::unique_ptr<shard_set> s_;
};

}  // namespace memshuffle

#include <memshuffle/sealed.hpp>
