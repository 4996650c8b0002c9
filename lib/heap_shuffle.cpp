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

void heap::begin_shuffle(std::span<move> moves, std::span<const window> windows,
                         std::span<std::byte* const> stay, layout_rng* rng, std::span<std::uint32_t> sequence) {
  const std::size_t count = arenas_.size();
  // Scratch only: on std::bad_alloc here the heap is untouched.
  plan_.assign(count, planned{});
  plan_.reserve(count + 8);
  roomy_.clear();
  roomy_.reserve(count + 8);
  cursor_.resize(windows.size());
  ready_at_.resize(windows.size());
  crediting_.clear(), draining_.clear();
  crediting_.reserve(windows.size()), draining_.reserve(windows.size());
  for (std::byte* p : stay) plan_[arena_number(p)].role |= keeps_entry;
  keeps_any_ = !stay.empty();
  for (std::uint32_t i = 0; i < windows.size(); ++i) {
    const window& w = windows[i];
    MEMSHUFFLE_ASSERT(std::is_sorted(moves.begin() + w.first, moves.begin() + w.last,
                                     [](const move& x, const move& y) { return x.from < y.from; }),
                      "heap::begin_shuffle: a window's moves must be sorted by address");
    plan_[w.arena].role |= has_window;
    plan_[w.arena].moved = w.last - w.first;
    cursor_[i] = w.first;
  }
  choose_destinations(windows);
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
  try {
    plan(moves, windows, rng, sequence);
  } catch (...) {
    while (arenas_.size() > count) arenas_.pop_back();  // the fresh arenas, never used
    plan_.clear();
    throw;
  }
}

// The destinations: the fullest arenas that are plain (not of their own, keeping no
// pinned entry), as many as hold the live bytes but one, and one empty arena if there
// is one; the room a fresh arena brings makes up the rest. The others are drained.
void heap::choose_destinations(std::span<const window> windows) {
  std::vector<std::pair<std::size_t, std::uint32_t>> plain;  // live bytes, number
  plain.reserve(arenas_.size());
  std::vector<std::size_t> live(arenas_.size(), 0);
  for (const window& w : windows) live[w.arena] = w.bytes;
  std::size_t total = 0, usable = arena_size_;
  for (std::uint32_t i = 0; i < arenas_.size(); ++i) {
    const arena& a = *arenas_[i];
    if ((plan_[i].role & keeps_entry) || a.capacity != arena_size_ || !a.has_chunk) continue;
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

void heap::plan(std::span<move> moves, std::span<const window> windows, layout_rng* rng,
                std::span<std::uint32_t> sequence) {
  std::size_t step = 0;
  if (rng == nullptr) {
    // In order, a draining window waits until there is room for it and an arena to
    // spare, so the windows read meanwhile find room.
    std::size_t deferred = 0;
    draining_.clear();
    const auto read = [&](std::uint32_t i) {
      while (cursor_[i] < windows[i].last) sequence[step++] = take(moves, windows[i], cursor_[i], rng);
    };
    for (std::uint32_t i = 0; i < windows.size(); ++i) {
      while (deferred < draining_.size() && room_ >= windows[draining_[deferred]].bytes + arena_size_)
        read(draining_[deferred++]);
      if (!(plan_[windows[i].arena].role & destination) && room_ < windows[i].bytes + arena_size_)
        draining_.push_back(i);
      else
        read(i);
    }
    while (deferred < draining_.size()) read(draining_[deferred++]);
    return;
  }
  // Draining windows give no room: while room is short, the next window is one that does.
  const std::size_t low_water = arena_size_ / 4;
  const auto draw = [&] {
    std::size_t i = bounded(*rng, crediting_.size() + draining_.size());
    if (i >= crediting_.size() && !crediting_.empty() && room_ < low_water) i = bounded(*rng, crediting_.size());
    const std::uint32_t wi = i < crediting_.size() ? crediting_[i] : draining_[i - crediting_.size()];
    __builtin_prefetch(&moves[cursor_[wi]], 1);
    __builtin_prefetch(&moves[cursor_[wi]].bytes, 1);  // a move may straddle two lines
    return wi;
  };
  // Drawn a few steps ahead, so that the window's next move is in cache when taken.
  constexpr std::size_t ahead = 8;
  std::array<std::uint32_t, ahead> drawn{};
  const std::size_t total = sequence.size();
  for (std::size_t d = 0; d < ahead && d < total; ++d) drawn[d] = draw();
  for (; step < total; ++step) {
    std::uint32_t wi = drawn[step % ahead];
    if (cursor_[wi] == windows[wi].last) wi = draw();  // finished since it was drawn
    sequence[step] = take(moves, windows[wi], cursor_[wi], rng);
    if (cursor_[wi] == windows[wi].last) {
      auto& ready = plan_[windows[wi].arena].role & destination ? crediting_ : draining_;
      const std::uint32_t at = ready_at_[wi];
      ready[at] = ready.back();
      ready_at_[ready[at]] = at;
      ready.pop_back();
    }
    if (step + ahead < total) drawn[step % ahead] = draw();
  }
}

// Places a window's next move, and gives its arena, if a destination, the room it left.
std::uint32_t heap::take(std::span<move> moves, const window& w, std::uint32_t& cursor, layout_rng* rng) {
  const std::uint32_t k = cursor++;
  place_move(moves[k], rng);  // before its own room is counted: it cannot land on itself
  if (plan_[w.arena].role & destination)
    set_room(w.arena, cursor < w.last ? reinterpret_cast<std::uintptr_t>(moves[cursor].from) : arenas_[w.arena]->limit);
  return k;
}

void heap::place_move(move& m, layout_rng* rng) {
  if (m.bytes > arena_size_) {
    place_alone(m);
    return;
  }
  if (!has_filling_ || !fits(filling_, m)) {
    std::uint32_t next = pick_roomy(m, rng);
    if (next == none) next = open_destination(std::size_t{1} << m.align_log2);
    if (!fits(next, m)) {
      place_alone(m);  // too large for an empty arena once aligned
      return;
    }
    filling_ = next;
    has_filling_ = true;
  }
  planned& d = plan_[filling_];
  const std::uintptr_t at = align_up(d.w, m.align_log2);
  m.to = reinterpret_cast<std::byte*>(at);
  m.align_log2 = static_cast<std::uint32_t>(at - d.w);  // from now on: the padding
  room_ -= at + m.bytes - d.w;
  d.w = at + m.bytes;
  ++d.written;
  if (d.w == d.f) drop_roomy(filling_);
}

bool heap::fits(std::uint32_t number, const move& m) const noexcept {
  const planned& d = plan_[number];
  const std::uintptr_t at = align_up(d.w, m.align_log2);
  return at >= d.w && at <= d.f && d.f - at >= m.bytes;
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

// A fresh destination, its chunk taken now (aligned for the entry about to go there).
std::uint32_t heap::open_destination(std::size_t alignment) {
  if (roomy_.size() == roomy_.capacity()) roomy_.reserve(roomy_.size() * 2);
  plan_.emplace_back();
  arena& a = open_arena(arena_size_);
  (void)a.res.allocate(1, alignment);
  a.res.reset();
  const auto number = static_cast<std::uint32_t>(a.pos);
  plan_[number].role = destination;
  plan_[number].w = plan_[number].f = a.base;
  set_room(number, a.limit);
  return number;
}

// An entry larger than an arena gets a fresh arena of its own, placed for real (no
// other entry goes there).
void heap::place_alone(move& m) {
  plan_.emplace_back();
  arena& own = open_arena(m.bytes);
  void* p = try_place(own, {m.bytes, std::size_t{1} << m.align_log2});
  if (p == nullptr) throw std::bad_alloc();
  m.to = static_cast<std::byte*>(p);
  m.align_log2 = 0;
  plan_[own.pos].role = placed_alone;
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
    unpoison(m.to - m.align_log2, m.align_log2 + m.bytes);
    if (m.align_log2 != 0) {
      secure_wipe(m.to - m.align_log2, m.align_log2);
      poison(m.to - m.align_log2, m.align_log2);
    }
    std::memcpy(m.to, m.from, m.bytes);
    if (keeps_any_ && (plan_[arena_number(m.from)].role & keeps_entry)) {
      secure_wipe(m.from, m.bytes);  // its arena stays: nothing else will cover it
      poison(m.from, m.bytes);
    }
  }
}

void heap::drop(std::byte* p, std::size_t bytes) noexcept {
  if (!keeps_any_) return;  // the bytes lie where a new entry or the end's wipe covers them
  const std::uint32_t number = arena_number(p);
  if (!(plan_[number].role & keeps_entry)) return;
  secure_wipe(p, bytes);
  poison(p, bytes);
  --arenas_[number]->entries;
}

void heap::end_shuffle() noexcept {
  current_ = nullptr;
  for (std::uint32_t i = 0; i < plan_.size(); ++i) {
    const planned& p = plan_[i];
    arena& a = *arenas_[i];
    if (p.role & keeps_entry) {
      a.entries -= p.moved;
    } else if (p.role & placed_alone) {
      a.entries = 1;
      a.serial = next_serial_++;
    } else if (!(p.role & destination) || p.written == 0) {
      a.entries = 0;  // given back below, wiped
    } else {
      if (a.top > p.w) {  // what departed entries left and no new one covers
        auto* rest = reinterpret_cast<std::byte*>(p.w);
        unpoison(rest, a.top - p.w);
        secure_wipe(rest, a.top - p.w);
        poison(rest, a.top - p.w);
      }
      a.res.reset();
      if (p.w > a.base) (void)a.res.allocate(p.w - a.base, 1);  // one bump for all (planned to fit)
      a.top = p.w;
      a.entries = p.written;
      a.serial = next_serial_++;
    }
  }
  if (has_filling_ && arenas_[filling_]->entries != 0 && !(plan_[filling_].role & placed_alone))
    current_ = arenas_[filling_].get();
  for (std::size_t i = arenas_.size(); i-- > 0;)
    if (arenas_[i]->entries == 0) release(*arenas_[i]);
  plan_.clear();
}

}  // namespace memshuffle::detail
