#pragma once
// The handle table: one 32-byte slot per entry, found by the index inside a handle and
// checked against the generation and the shuffler's tag also inside it. Slots of freed
// entries are reused with a higher generation, so an old handle never names the new
// entry; a slot whose generation is used up is retired instead of reused. A tag
// belongs to one live table at a time (the tag registry below), and a table that
// reuses a tag starts above every generation the tag's earlier tables handed out, so a
// handle is never valid in a table other than the one that made it.
// Not synchronized: the shuffler calls it under its lock.
#include <cstddef>
#include <cstdint>
#include <memory_resource>
#include <vector>

#include <memshuffle/handle.hpp>

namespace memshuffle::detail {

enum class entry_state : std::uint8_t {
  unused,   // on the free list (or retired)
  at_rest,  // ciphertext in its arena, no lease
  opening,  // first lease being decrypted, outside the lock
  open,     // plaintext, pins > 0
  sealing,  // last lease ended, being encrypted outside the lock
  doomed,   // freed; bytes dropped at the next shuffle
};

inline constexpr std::uint16_t no_key = 0xFFFF;

struct entry {
  std::byte* data = nullptr;  // the entry's bytes in an arena (plus the tag, under GCM)
  // at_rest: the counter value of its last encryption; open with a plaintext window:
  // the window's address; unused: the next free slot.
  std::uint64_t aux = 0;
  std::uint64_t size : 40 = 0;
  std::uint64_t align_log2 : 6 = 0;
  std::uint64_t state : 3 = 0;
  std::uint64_t written : 1 = 0;           // 0: reads as zeros, nothing to decrypt
  std::uint64_t free_on_return : 1 = 0;    // sealed<T> ended while rented
  std::uint32_t generation = 0;
  std::uint16_t pins = 0;
  std::uint16_t key = no_key;  // the key slot its ciphertext is under

  entry_state st() const noexcept { return static_cast<entry_state>(state); }
  void set(entry_state s) noexcept { state = static_cast<std::uint8_t>(s); }
  std::size_t alignment() const noexcept { return std::size_t{1} << align_log2; }
  bool live() const noexcept {
    const auto s = st();
    return s != entry_state::unused && s != entry_state::doomed;
  }
};
static_assert(sizeof(entry) == 32, "a table slot is 32 bytes");

class handle_table {
 public:
  static constexpr unsigned index_bits = 28;
  static constexpr unsigned generation_bits = 20;
  static constexpr std::uint32_t max_index = (1u << index_bits) - 1;
  static constexpr std::uint32_t max_generation = (1u << generation_bits) - 1;
  static constexpr std::size_t max_entry_size = (std::uint64_t{1} << 40) - 1;

  // tag: nonzero, 16 bits; it keeps every handle apart from invalid_handle too.
  // first_generation: every slot's first; storage: where the slots live (old storage
  // is wiped before it goes back, as are the slots when the table ends).
  explicit handle_table(std::uint16_t tag, std::uint32_t first_generation = 0,
                        std::pmr::memory_resource* storage = std::pmr::new_delete_resource());
  ~handle_table();
  handle_table(const handle_table&) = delete;
  handle_table& operator=(const handle_table&) = delete;

  // Makes room so that the next acquire() cannot throw (std::bad_alloc otherwise,
  // with the table unchanged).
  void reserve_one();
  // A slot for a new entry, state unused and everything else zero.
  std::uint32_t acquire() noexcept;
  // The entry in slot i is freed: its handles are invalid from now on.
  void invalidate(std::uint32_t i) noexcept;
  // Slot i (already invalidated) can be reused.
  void recycle(std::uint32_t i) noexcept;

  // The slot h names, if h is from this table, in range and of the current generation;
  // nullptr otherwise. Unused and doomed slots never match (their generation moved on).
  entry* find(handle h) noexcept;
  const entry* find(handle h) const noexcept;
  std::uint32_t index_of(handle h) const noexcept {
    return static_cast<std::uint32_t>(static_cast<std::uint64_t>(h) & max_index);
  }
  handle handle_of(std::uint32_t i) const noexcept;

  entry& operator[](std::uint32_t i) noexcept { return slots_[i]; }
  const entry& operator[](std::uint32_t i) const noexcept { return slots_[i]; }
  std::uint32_t slots() const noexcept { return static_cast<std::uint32_t>(slots_.size()); }
  std::size_t metadata_bytes() const noexcept { return slots_.size() * sizeof(entry); }
  // Of metadata_bytes(), those on pages advised to be huge (the storage's block is).
  std::size_t huge_page_bytes() const noexcept;
  std::uint16_t tag() const noexcept { return tag_; }
  // The first generation no handle of this table has used (a retired slot's included).
  std::uint32_t generations_used() const noexcept;

 private:
  static constexpr std::uint32_t none = 0xFFFF'FFFF;

  void grow(std::size_t capacity);

  std::pmr::vector<entry> slots_;
  std::uint32_t free_head_ = none;
  std::uint32_t first_generation_;
  std::uint16_t tag_;
};

// The process-wide tag registry. A tag goes to one live table at a time, with the
// first generation its earlier tables never used; a tag whose generations are used up
// is retired. Thread safe.
struct tag_grant {
  std::uint16_t tag;
  std::uint32_t first_generation;
};
// Throws memshuffle::error when every tag is in use or retired.
tag_grant acquire_tag();
// The table that held tag ends; generations_used: its generations_used().
void release_tag(std::uint16_t tag, std::uint32_t generations_used) noexcept;

}  // namespace memshuffle::detail
