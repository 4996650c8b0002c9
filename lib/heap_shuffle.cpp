// The heap's full shuffle, in place (docs/design.md, "Heap"): the plan, the moves and
// the end. Every entry's bytes go into room that entries read earlier in the sequence
// left behind, so nothing but an arena or two is taken from the upstream.
#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <utility>

#include <memshuffle/detail/assert.hpp>
#include <memshuffle/secure_wipe.hpp>

#include "heap.hpp"
#include "heap_arena.hpp"

namespace memshuffle::detail {

namespace {
constexpr std::uint32_t none = std::numeric_limits<std::uint32_t>::max();

std::uintptr_t align_up(std::uintptr_t at, std::uint32_t align_log2) {
  const std::uintptr_t align = std::uintptr_t{1} << align_log2;
  return (at + align - 1) & ~(align - 1);
}
}  // namespace

void heap::begin_shuffle(std::span<move> moves, std::span<const window> windows, layout_rng* rng) {
  const std::size_t count = arenas_.size();
  // Scratch only: on std::bad_alloc here the heap is untouched.
  plan_.assign(count, planned{});
  plan_.reserve(count + 8);
  for (std::size_t i = holding_ ? held_ : count; i < count; ++i) plan_[i].role = outside;
  roomy_.clear();
  roomy_.reserve(count + 8);
  cursor_.resize(windows.size());
  ready_at_.resize(windows.size());
  crediting_.clear(), draining_.clear();
  crediting_.reserve(windows.size()), draining_.reserve(windows.size());
  gaps_.clear();
  gap_slots_ = 0;
  kept_moves_ = moves.data();
  total_ = 0;
  for (std::uint32_t i = 0; i < windows.size(); ++i) {
    const window& w = windows[i];
    MEMSHUFFLE_ASSERT(std::is_sorted(moves.begin() + w.first, moves.begin() + w.last,
                                     [](const move& x, const move& y) { return x.from < y.from; }),
                      "heap::begin_shuffle: a window's moves must be sorted by address");
    cursor_[i] = w.first;
    total_ += w.last - w.first;
  }
  try {
    choose_destinations(windows);
  } catch (...) {
    plan_.clear();
    throw;
  }
  room_ = 0;
  has_filling_ = false;
  for (std::uint32_t i = 0; i < count; ++i) {
    if (!(plan_[i].role & destination)) continue;
    plan_[i].w = plan_[i].f = arenas_[i]->base;
    set_room(i, arenas_[i]->limit);  // lowered below for an arena with entries to read
  }
  for (std::uint32_t i = 0; i < windows.size(); ++i) {
    planned& p = plan_[windows[i].arena];
    if (p.role & destination) {
      room_ -= p.f - reinterpret_cast<std::uintptr_t>(moves[windows[i].first].from);
      p.f = reinterpret_cast<std::uintptr_t>(moves[windows[i].first].from);
      if (p.f == p.w) drop_roomy(windows[i].arena);
    }
    auto& ready = p.role & destination ? crediting_ : draining_;
    ready_at_[i] = static_cast<std::uint32_t>(ready.size());
    ready.push_back(i);
  }
  step_ = 0;
  reading_ = none, next_window_ = 0, deferred_ = 0;
  if (rng == nullptr) draining_.clear();  // in order: the windows deferred
  for (std::size_t d = 0; rng != nullptr && d < ahead && d < total_; ++d) drawn_[d] = draw(moves, *rng);
}

void heap::begin_shuffle(std::span<move> moves, std::span<const window> windows, layout_rng* rng,
                         std::span<std::uint32_t> sequence) {
  const std::size_t count = arenas_.size();
  begin_shuffle(moves, windows, rng);
  try {
    std::size_t step = 0;
    while (step < sequence.size()) {
      const std::uint32_t wi = next_window(moves, windows, rng);
      sequence[step++] = take(moves, windows[wi], cursor_[wi], rng, {}, false);
      if (rng != nullptr) retire(windows, wi);
    }
  } catch (...) {
    while (arenas_.size() > count) arenas_.pop_back();  // the fresh arenas, never used
    plan_.clear();
    throw;
  }
}

std::size_t heap::plan_part(std::span<move> moves, std::span<const window> windows, layout_rng* rng, keep_test keep,
                            std::span<std::uint32_t> sequence) {
  std::size_t n = 0;
  for (; n < sequence.size() && step_ < total_; ++n) {
    const std::uint32_t wi = next_window(moves, windows, rng);
    sequence[n] = take(moves, windows[wi], cursor_[wi], rng, keep, true);
    if (rng != nullptr) retire(windows, wi);
  }
  return n;
}

// The destinations: the fullest arenas that are plain (not of their own), as many as
// hold the live bytes but one, and one empty arena if there is one; the room a fresh
// arena brings makes up the rest. The others are drained.
void heap::choose_destinations(std::span<const window> windows) {
  std::vector<std::pair<std::size_t, std::uint32_t>> plain;  // live bytes, number
  plain.reserve(arenas_.size());
  std::vector<std::size_t> live(arenas_.size(), 0);
  for (const window& w : windows) live[w.arena] = w.bytes;
  std::size_t total = 0, usable = arena_size_;
  for (std::uint32_t i = 0; i < arenas_.size(); ++i) {
    const arena& a = *arenas_[i];
    if ((plan_[i].role & outside) || a.capacity != arena_size_ || a.chunk_bytes == 0) continue;
    plain.push_back({live[i], i});
    total += live[i];
    usable = std::min<std::size_t>(usable, a.limit - a.base);
  }
  std::sort(plain.begin(), plain.end(), std::greater<>());
  const std::size_t needed = total == 0 ? 0 : (total + usable - 1) / usable - 1;
  for (std::size_t k = 0; k < plain.size(); ++k)
    if (k < needed) plan_[plain[k].second].role |= destination;
  if (needed < plain.size() && plain.back().first == 0) plan_[plain.back().second].role |= destination;
}

// The window whose next move is the plan's next step.
std::uint32_t heap::next_window(std::span<move> moves, std::span<const window> windows, layout_rng* rng) {
  if (rng == nullptr) return next_in_order(windows);
  std::uint32_t wi = drawn_[step_ % ahead];
  if (cursor_[wi] == windows[wi].last) wi = draw(moves, *rng);  // finished since it was drawn
  if (step_ + ahead < total_) drawn_[step_ % ahead] = draw(moves, *rng);
  ++step_;
  return wi;
}

// In order, a draining window waits until there is room for it and an arena to spare,
// so the windows read meanwhile find room.
std::uint32_t heap::next_in_order(std::span<const window> windows) noexcept {
  ++step_;
  for (;;) {
    if (reading_ != none && cursor_[reading_] < windows[reading_].last) return reading_;
    if (deferred_ < draining_.size() && room_ >= windows[draining_[deferred_]].bytes + arena_size_) {
      reading_ = draining_[deferred_++];
    } else if (next_window_ < windows.size()) {
      const std::uint32_t i = next_window_++;
      reading_ = none;
      if (!(plan_[windows[i].arena].role & destination) && room_ < windows[i].bytes + arena_size_)
        draining_.push_back(i);  // reserved for every window by begin_shuffle
      else
        reading_ = i;
    } else {
      reading_ = draining_[deferred_++];  // step_ <= total_: some window has moves left
    }
  }
}

// A window drawn at random. Draining windows give no room: while room is short, the
// next window is one that does. Drawn a few steps ahead, so that the window's next move
// is in cache when taken.
std::uint32_t heap::draw(std::span<move> moves, layout_rng& rng) noexcept {
  const std::size_t low_water = arena_size_ / 4;
  std::size_t i = bounded(rng, crediting_.size() + draining_.size());
  if (i >= crediting_.size() && !crediting_.empty() && room_ < low_water) i = bounded(rng, crediting_.size());
  const std::uint32_t wi = i < crediting_.size() ? crediting_[i] : draining_[i - crediting_.size()];
  __builtin_prefetch(&moves[cursor_[wi]], 1);
  __builtin_prefetch(&moves[cursor_[wi]].bytes, 1);  // a move may straddle two lines
  return wi;
}

// A window read to its end leaves the draw.
void heap::retire(std::span<const window> windows, std::uint32_t wi) noexcept {
  if (cursor_[wi] != windows[wi].last) return;
  auto& ready = plan_[windows[wi].arena].role & destination ? crediting_ : draining_;
  const std::uint32_t at = ready_at_[wi];
  ready[at] = ready.back();
  ready_at_[ready[at]] = at;
  ready.pop_back();
}

// Places a window's next move, and gives its arena, if a destination, the room it left;
// or keeps the entry where it is.
std::uint32_t heap::take(std::span<move> moves, const window& w, std::uint32_t& cursor, layout_rng* rng,
                         keep_test keep, bool absorb) {
  const std::uint32_t k = cursor++;
  kept_moves_ = moves.data();
  // Placed before its own room is counted: it cannot land on itself.
  const bool kept = keep(moves[k]) || !place_move(moves[k], rng, absorb);
  if (kept) keep_in_place(moves, k, w.arena);
  if ((plan_[w.arena].role & (destination | room_capped)) == destination) {
    set_room(w.arena, cursor < w.last ? reinterpret_cast<std::uintptr_t>(moves[cursor].from) : arenas_[w.arena]->limit);
    if (kept) room_ -= moves[k].bytes;  // inside [w, f), but no room
  }
  return k;
}

// The entry stays: its arena keeps it. A destination's room runs on above it (its
// writes pass over it later), unless no gap can be noted: then the room ends below it
// for good. Either way no write lands on it: the room [w, f) ends at its address now.
void heap::keep_in_place(std::span<move> moves, std::uint32_t k, std::uint32_t number) noexcept {
  planned& p = plan_[number];
  moves[k].to = nullptr;
  moves[k].align_log2 = none;
  if (p.kept_last != none)
    moves[p.kept_last].align_log2 = k;  // entries are taken in address order
  else
    p.kept_first = k;
  p.kept_last = k;
  ++p.kept;
  if (!(p.role & destination) || (p.role & room_capped)) return;
  if (!reserve_gap()) {
    p.role |= room_capped;
  } else if (p.barrier == none) {
    p.barrier = k;  // every kept entry before it lies below w
  }
}

// Room for one more gap, so that passing over a kept entry never allocates.
bool heap::reserve_gap() noexcept {
  if (gap_slots_ == gaps_.capacity()) {
    try {
      gaps_.reserve(2 * gap_slots_ + 8);
    } catch (const std::bad_alloc&) {
      return false;
    }
  }
  ++gap_slots_;
  return true;
}

// Returns false when the upstream failed and absorb is set (the entry then stays).
bool heap::place_move(move& m, layout_rng* rng, bool absorb) {
  std::uintptr_t at = 0;
  try {
    if (m.bytes > arena_size_) {
      place_alone(m);
      return true;
    }
    at = has_filling_ ? spot(filling_, m) : 0;
    if (at == 0) {
      std::uint32_t next = pick_roomy(m, rng);
      if (next == none) next = open_destination(std::size_t{1} << m.align_log2);
      at = spot(next, m);
      if (at == 0) {
        place_alone(m);  // too large for an empty arena once aligned
        return true;
      }
      filling_ = next;
      has_filling_ = true;
    }
  } catch (const std::bad_alloc&) {
    if (!absorb) throw;
    return false;
  }
  planned& d = plan_[filling_];
  // Pass over the kept entries below at: the bytes left below each are wiped at the end.
  while (d.barrier != none && reinterpret_cast<std::uintptr_t>(kept_moves_[d.barrier].from) < at) {
    const move& b = kept_moves_[d.barrier];
    const auto from = reinterpret_cast<std::uintptr_t>(b.from);
    if (from > d.w) gaps_.emplace_back(d.w, from);  // reserved when b was kept
    room_ -= from - d.w;
    d.w = from + b.bytes;
    d.barrier = b.align_log2;
  }
  m.to = reinterpret_cast<std::byte*>(at);
  m.align_log2 = static_cast<std::uint32_t>(at - d.w);  // from now on: the padding
  room_ -= at + m.bytes - d.w;
  d.w = at + m.bytes;
  ++d.written;
  if (d.w == d.f) drop_roomy(filling_);
  return true;
}

// Where m goes in a destination's room: at its write pointer, or past the kept entries
// it does not fit below; 0 when the room cannot take it.
std::uintptr_t heap::spot(std::uint32_t number, const move& m) const noexcept {
  const planned& d = plan_[number];
  if (d.barrier == none) {  // no kept entry in the way: the common case
    const std::uintptr_t at = align_up(d.w, m.align_log2);
    return at >= d.w && at <= d.f && d.f - at >= m.bytes ? at : 0;
  }
  std::uintptr_t w = d.w;
  for (std::uint32_t b = d.barrier;; b = kept_moves_[b].align_log2) {
    const std::uintptr_t end = b != none ? reinterpret_cast<std::uintptr_t>(kept_moves_[b].from) : d.f;
    const std::uintptr_t at = align_up(w, m.align_log2);
    if (at >= w && at <= end && end - at >= m.bytes) return at;
    if (b == none) return 0;
    w = end + kept_moves_[b].bytes;
    if (w > d.f) return 0;  // the room ends below it (room_capped)
  }
}

// A destination with room for m: drawn at random among those with room (a few draws,
// then the first that fits from where the last draw fell), or without rng the one that
// gained room last. Its own arena will do: the room there lies below it. Room too small
// for anything leaves the draw until the arena gains more; room too small for m alone
// stays for smaller entries, so no arena is opened while room for m is left. A large
// entry takes the tightest room it fits (the random draws would leave every arena a
// tail too small for the large entries still to come).
std::uint32_t heap::pick_roomy(const move& m, layout_rng* rng) noexcept {
  constexpr int draws = 4;
  constexpr std::uintptr_t crumb = 16;  // room below this takes no entry worth a draw
  if (rng != nullptr && m.bytes >= arena_size_ / 16) {
    std::uint32_t best = none;
    for (const std::uint32_t n : roomy_)
      if (fits(n, m) && (best == none || plan_[n].f - plan_[n].w < plan_[best].f - plan_[best].w)) best = n;
    return best;
  }
  std::size_t i = 0;
  for (int t = 0; t < draws && !roomy_.empty(); ++t) {
    i = rng != nullptr ? bounded(*rng, roomy_.size()) : roomy_.size() - 1;
    const std::uint32_t n = roomy_[i];
    if (fits(n, m)) return n;
    if (plan_[n].f - plan_[n].w < crumb || rng == nullptr) drop_roomy(n);
  }
  for (std::size_t k = 0; k < roomy_.size(); ++k) {
    const std::uint32_t n = roomy_[(i + k) % roomy_.size()];
    if (fits(n, m)) return n;
  }
  return none;
}

void heap::set_room(std::uint32_t number, std::uintptr_t f) noexcept {
  planned& p = plan_[number];
  room_ += f - p.f;
  p.f = f;
  if (p.roomy == 0 && p.f > p.w) {
    roomy_.push_back(number);  // reserved for every arena, and the fresh ones get their own
    p.roomy = static_cast<std::uint32_t>(roomy_.size());
  }
}

void heap::drop_roomy(std::uint32_t number) noexcept {
  planned& p = plan_[number];
  if (p.roomy == 0) return;
  const std::uint32_t last = roomy_.back();
  roomy_[p.roomy - 1] = last;
  plan_[last].roomy = p.roomy;
  roomy_.pop_back();
  p.roomy = 0;
}

// A fresh arena for the plan, numbered after every arena open now (arenas opened for
// allocations meanwhile are marked as outside the shuffle). On std::bad_alloc the heap
// and the plan are as before.
heap::arena& heap::open_planned(std::size_t capacity, std::uint8_t role) {
  planned other;
  other.role = outside;
  plan_.resize(arenas_.size(), other);
  plan_.emplace_back();
  try {
    arena& a = open_arena(capacity);
    plan_.back().role = role;
    return a;
  } catch (...) {
    plan_.pop_back();
    throw;
  }
}

// A fresh destination, its chunk taken now (aligned for the entry about to go there).
std::uint32_t heap::open_destination(std::size_t alignment) {
  if (roomy_.size() == roomy_.capacity()) roomy_.reserve(roomy_.size() * 2);
  arena& a = open_planned(arena_size_, destination);
  try {
    (void)a.res.allocate(1, alignment);
  } catch (...) {
    arenas_.pop_back();
    plan_.pop_back();
    throw;
  }
  a.res.reset();
  const auto number = static_cast<std::uint32_t>(a.pos);
  plan_[number].w = plan_[number].f = a.base;
  set_room(number, a.limit);
  return number;
}

// An entry larger than an arena gets a fresh arena of its own, placed for real (no
// other entry goes there).
void heap::place_alone(move& m) {
  arena& own = open_planned(m.bytes, placed_alone);
  void* p = nullptr;
  try {
    p = try_place(own, {m.bytes, std::size_t{1} << m.align_log2});
    if (p == nullptr) throw std::bad_alloc();
  } catch (...) {
    arenas_.pop_back();
    plan_.pop_back();
    throw;
  }
  m.to = static_cast<std::byte*>(p);
  m.align_log2 = 0;
  plan_[own.pos].written = 1;
}

void heap::run_moves(std::span<const move> moves, std::span<const std::uint32_t> sequence) noexcept {
  // The sources and destinations are known ahead: ask for them before they are needed.
  constexpr std::size_t ahead = 8;
  const std::size_t n = sequence.size();
  for (std::size_t k = 0; k < n; ++k) {
    if (k + 2 * ahead < n) __builtin_prefetch(&moves[sequence[k + 2 * ahead]]);
    if (k + ahead < n) {
      const move& next = moves[sequence[k + ahead]];
      __builtin_prefetch(next.from);
      __builtin_prefetch(next.to, 1);
    }
    const move& m = moves[sequence[k]];
    if (m.to == nullptr) continue;  // kept in place
    unpoison(m.to - m.align_log2, m.align_log2 + m.bytes);
    if (m.align_log2 != 0) {
      secure_wipe(m.to - m.align_log2, m.align_log2);
      poison(m.to - m.align_log2, m.align_log2);
    }
    std::memcpy(m.to, m.from, m.bytes);
  }
}

namespace {
// Wipes and poisons [from, to).
void wipe_range(std::uintptr_t from, std::uintptr_t to) noexcept {
  if (to <= from) return;
  auto* p = reinterpret_cast<std::byte*>(from);
  unpoison(p, to - from);
  secure_wipe(p, to - from);
  poison(p, to - from);
}
}  // namespace

void heap::end_shuffle(std::span<const move> moves) noexcept {
  current_ = nullptr;
  holding_ = false;
  for (const auto& [from, to] : gaps_) wipe_range(from, to);
  gaps_.clear();
  for (std::uint32_t i = 0; i < plan_.size(); ++i) {
    const planned& p = plan_[i];
    arena& a = *arenas_[i];
    if (p.role & outside) continue;
    if (p.role & placed_alone) {
      a.entries = 1;
      a.serial = next_serial_++;
    } else if ((p.role & destination) && p.written + p.kept != 0) {
      settle_destination(moves, i);
    } else if (p.kept != 0) {  // drained but for entries kept in place: it stays
      wipe_except_kept(moves, i, a.base, a.top);
      a.entries = p.kept;
    } else {
      a.entries = 0;  // given back below, wiped
    }
  }
  if (has_filling_ && arenas_[filling_]->entries != 0 && !(plan_[filling_].role & placed_alone))
    current_ = arenas_[filling_].get();
  for (std::size_t i = arenas_.size(); i-- > 0;)
    if (arenas_[i]->entries == 0) release(*arenas_[i]);
  plan_.clear();
}

// A destination takes its placements (and the entries kept in place) as one bump, and
// what departed entries left and no new one covers is wiped.
void heap::settle_destination(std::span<const move> moves, std::uint32_t number) noexcept {
  const planned& p = plan_[number];
  arena& a = *arenas_[number];
  std::uintptr_t end = p.w;
  if (p.kept_last != none)
    end = std::max(end, reinterpret_cast<std::uintptr_t>(moves[p.kept_last].from) + moves[p.kept_last].bytes);
  wipe_except_kept(moves, number, p.w, a.top);
  a.res.reset();
  if (end > a.base) (void)a.res.allocate(end - a.base, 1);  // planned to fit
  a.top = end;
  a.entries = p.written + p.kept;
  a.serial = next_serial_++;
}

// Wipes and poisons [begin, end) but the entries of the arena kept in place (listed by
// ascending address).
void heap::wipe_except_kept(std::span<const move> moves, std::uint32_t number, std::uintptr_t begin,
                            std::uintptr_t end) noexcept {
  for (std::uint32_t k = plan_[number].kept_first; k != none; k = moves[k].align_log2) {
    const auto from = reinterpret_cast<std::uintptr_t>(moves[k].from);
    wipe_range(begin, std::min(from, end));
    begin = std::max(begin, from + moves[k].bytes);
  }
  wipe_range(begin, end);
}

void heap::hold() noexcept {
  current_ = nullptr;
  holding_ = true;
  held_ = arenas_.size();
}

void heap::release_hold() noexcept {
  holding_ = false;
  for (std::size_t i = arenas_.size(); i-- > 0;)
    if (arenas_[i]->entries == 0) release(*arenas_[i]);
}

}  // namespace memshuffle::detail
