// The shuffler's moves: the full shuffle, the incremental shuffle and the move of one
// entry on its return (docs/design.md, "Heap"); the policies' compaction is in
// compaction.cpp.
// All run under the shuffler's lock.
#include <array>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "shuffler_impl.hpp"

namespace memshuffle {

void shuffler::impl::begin_full() {
  const shuffle_timer timer{counters};
  doomed.clear(), windows.clear();
  heap.index_arenas();
  const auto arenas = static_cast<std::uint32_t>(heap.arenas());
  run_end.resize(arenas);
  run_bytes.assign(arenas, 0);
  std::uint32_t total = 0;
  for (std::uint32_t a = 0; a < arenas; ++a) {
    run_end[a] = total;  // the next free place of the run, for now
    total += static_cast<std::uint32_t>(heap.entries_in(a));
  }
  plan.reserve(total);  // no element touched yet: grown a part at a time
  windows.reserve(arenas);
  full.part.resize(part_moves);
  heap.hold();
  full.at = full_state::phase::grow;
  full.cursor = 0;
  full.slots = table.slots();
  full.arenas = arenas;
  full.total = total;
  full.unsettled = 0;
}

void shuffler::impl::fault_in_plan() noexcept {
  detail::huge_page_resource::fault_in(plan.data(), plan.capacity() * sizeof(detail::move));
}

bool shuffler::impl::shuffle_part() {
  using phase = full_state::phase;
  const shuffle_timer timer{counters};
  try {
    switch (full.at) {
      case phase::grow:
        plan.resize(std::min<std::size_t>(full.total, plan.size() + part_slots));
        if (plan.size() >= full.total) full.at = phase::gather;
        break;
      case phase::gather: gather_part(); break;
      case phase::windows: {
        std::uint32_t first = 0;
        for (std::uint32_t a = 0; a < full.arenas; ++a) {
          if (run_end[a] != first) windows.push_back({a, first, run_end[a], run_bytes[a]});
          first += static_cast<std::uint32_t>(heap.entries_in(a));
        }
        full.at = phase::sort, full.cursor = 0;
        break;
      }
      case phase::sort: sort_part(); break;
      case phase::begin: begin_moves(); break;
      case phase::move: move_part(); break;
      case phase::drop: drop_part(); break;
      case phase::end: end_full(); break;
      case phase::idle: break;
    }
  } catch (...) {
    // Before the first move: nothing changed but the heap's hold, which ends here.
    heap.release_hold();
    full.at = phase::idle;
    throw;
  }
  return full.at != phase::idle;
}

// The next part_slots slots. Entries placed since the shuffle began lie in arenas of
// their own (numbered from full.arenas on) and are left alone. A pinned entry is planned
// too: most are returned before their turn, and one still pinned then stays, which the
// heap's destinations write around (an arena kept whole for it would cost an arena).
void shuffler::impl::gather_part() {
  const std::uint32_t end = std::min(full.slots, full.cursor + part_slots);
  for (std::uint32_t i = full.cursor; i < end; ++i) {
    const entry& e = table[i];
    if (e.st() == entry_state::unused) continue;
    const std::uint32_t a = heap.arena_number(e.data);
    if (a >= full.arenas) continue;  // freed or not, the next shuffle's: its arena keeps its count
    if (e.st() == entry_state::doomed) {
      doomed.push_back(i);
      continue;
    }
    if (e.st() != entry_state::at_rest) ++full.unsettled;  // looked at again at its turn
    plan[run_end[a]++] = {e.data, nullptr, stored_bytes(e), i, static_cast<std::uint32_t>(e.align_log2)};
    run_bytes[a] += stored_bytes(e);
  }
  full.cursor = end;
  if (end == full.slots) full.at = full_state::phase::windows;
}

namespace {
// A window's moves by address: a counting sort on the address cut into about as many
// buckets as moves, then an insertion sort for the few that share a bucket. Linear,
// where a comparison sort of the windows cost more than the rest of the shuffle.
void sort_by_address(std::span<detail::move> w, std::vector<std::uint32_t>& counts,
                     std::vector<detail::move>& scratch) {
  const auto earlier = [](const detail::move& x, const detail::move& y) { return x.from < y.from; };
  if (std::is_sorted(w.begin(), w.end(), earlier)) return;
  const auto [lo, hi] = std::minmax_element(w.begin(), w.end(), earlier);
  const auto base = reinterpret_cast<std::uintptr_t>(lo->from);
  const std::uintptr_t span = reinterpret_cast<std::uintptr_t>(hi->from) - base;
  unsigned shift = 0;
  while ((span >> shift) >= 2 * w.size()) ++shift;
  counts.assign((span >> shift) + 2, 0);
  const auto bucket = [&](const detail::move& m) { return (reinterpret_cast<std::uintptr_t>(m.from) - base) >> shift; };
  for (const detail::move& m : w) ++counts[bucket(m) + 1];
  for (std::size_t b = 1; b < counts.size(); ++b) counts[b] += counts[b - 1];
  for (const detail::move& m : w) scratch[counts[bucket(m)]++] = m;
  for (std::size_t i = 1; i < w.size(); ++i) {
    const detail::move m = scratch[i];
    std::size_t j = i;
    for (; j > 0 && m.from < scratch[j - 1].from; --j) scratch[j] = scratch[j - 1];
    scratch[j] = m;
  }
  std::copy(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(w.size()), w.begin());
}
}  // namespace

// The windows' moves by address, which the heap reads front to back, about
// 4 * part_slots moves a part; the layout's randomness is drawn by the heap, which
// interleaves the windows. Without randomize_layout the windows go in the order their
// arenas were filled.
void shuffler::impl::sort_part() {
  if (full.cursor == 0 && !opt.randomize_layout) {
    std::sort(windows.begin(), windows.end(), [&](const detail::window& x, const detail::window& y) {
      return heap.serial_at(x.arena) < heap.serial_at(y.arena);
    });
  }
  std::size_t sorted = 0;
  for (; full.cursor < windows.size() && sorted < 4 * part_slots; ++full.cursor) {
    const detail::window& w = windows[full.cursor];
    if (sort_scratch.size() < w.last - w.first) sort_scratch.resize(w.last - w.first);
    sort_by_address(std::span(plan).subspan(w.first, w.last - w.first), run_end, sort_scratch);
    sorted += w.last - w.first;
  }
  if (full.cursor == windows.size()) full.at = full_state::phase::begin;
}

void shuffler::impl::begin_moves() {
  heap.begin_shuffle(plan, windows, opt.randomize_layout ? &rng : nullptr);
  std::size_t moves = 0, bytes = 0;
  for (const detail::window& w : windows) moves += w.last - w.first, bytes += w.bytes;
  const std::size_t average = std::max<std::size_t>(1, bytes / std::max<std::size_t>(1, moves));
  full.moves_per_part = static_cast<std::uint32_t>(std::clamp<std::size_t>(part_bytes / average, min_part_moves, part_moves));
  full.at = full_state::phase::move;
}

// The next part_moves steps of the plan, moved at once (each write lands on bytes whose
// entries were copied out at an earlier step), and their slots pointed at the new
// places. An entry pinned when its turn comes stays where it is.
void shuffler::impl::move_part() {
  constexpr auto pinned = [](const void* self, const detail::move& m) noexcept {
    const impl& me = *static_cast<const impl*>(self);
    if (me.full.unsettled == 0) return false;  // spares a cache miss on the slot per move
    const entry_state st = me.table[m.slot].st();
    return st != entry_state::at_rest && st != entry_state::doomed;
  };
  const std::size_t n = heap.plan_part(plan, windows, opt.randomize_layout ? &rng : nullptr, {this, pinned},
                                       std::span(full.part).first(full.moves_per_part));
  const std::span<const std::uint32_t> sequence(full.part.data(), n);
  heap.run_moves(plan, sequence);
  for (const std::uint32_t k : sequence) {
    const detail::move& m = plan[k];
    if (m.to == nullptr) continue;
    table[m.slot].data = m.to;
    counters.bytes_moved += m.bytes;
  }
  if (n == 0) full.at = full_state::phase::drop, full.cursor = 0;
}

// The freed entries' slots go back. Their bytes need nothing now: in the shuffle's
// arenas a new entry or the end's wipe covers them.
void shuffler::impl::drop_part() noexcept {
  const auto end = static_cast<std::uint32_t>(std::min<std::size_t>(doomed.size(), full.cursor + part_slots));
  for (std::uint32_t k = full.cursor; k < end; ++k) table.recycle(doomed[k]);
  counters.pending_free_entries -= end - full.cursor;
  full.cursor = end;
  if (end == doomed.size()) full.at = full_state::phase::end;
}

void shuffler::impl::end_full() noexcept {
  heap.end_shuffle(plan);
  pass.active = false;  // a full shuffle ends any incremental pass
  ++counters.shuffles;
  full.at = full_state::phase::idle;
}

void shuffler::impl::shuffle(std::size_t budget) {
  if (full_active()) return;  // a full shuffle under way does this work
  const shuffle_timer timer{counters};
  const bool starting = !pass.active;
  const detail::index_permutation order =
      starting ? detail::index_permutation(table.slots(), opt.randomize_layout ? &rng : nullptr) : pass.order;
  const std::uint64_t serial = starting ? heap.next_serial() : pass.serial;
  std::uint64_t cursor = starting ? 0 : pass.cursor;
  moves.clear(), reqs.clear(), doomed.clear(), sources.clear();
  std::size_t planned = 0, idle = 0;  // idle: slots visited with nothing to move
  // The slots are visited at random, and each visit misses the cache and the TLB for
  // the slot, the entry's arena record and the entry's bytes (read when it moves). So
  // the visits are a pipeline: a slot is asked for 2 * ahead visits early; ahead visits
  // early it is read, its arena found, and the arena record and the bytes asked for.
  constexpr std::uint64_t ahead = 8, depth = 2 * ahead;
  struct looked {
    std::uint32_t i;
    detail::heap::where w;
  };
  std::array<std::uint32_t, depth> slot_at{};
  std::array<looked, ahead> looked_at{};
  const auto ask = [&](std::uint64_t k) {
    const auto i = static_cast<std::uint32_t>(order(k));
    slot_at[k % depth] = i;
    __builtin_prefetch(&table[i]);
  };
  const auto look = [&](std::uint64_t k) {
    const std::uint32_t i = slot_at[k % depth];
    const entry& e = table[i];
    detail::heap::where w;
    if (e.st() == entry_state::at_rest) {
      w = heap.locate(e.data);
      detail::heap::prefetch(w);
      __builtin_prefetch(e.data);
    }
    looked_at[k % ahead] = {i, w};
  };
  const std::uint64_t end = order.size();
  for (std::uint64_t k = cursor; k < std::min(cursor + depth, end); ++k) ask(k);
  for (std::uint64_t k = cursor; k < std::min(cursor + ahead, end); ++k) look(k);
  for (const std::uint64_t first = cursor;
       cursor < end && (cursor == first || planned + idle * slot_visit_bytes < budget); ++cursor) {
    if (cursor + depth < end) ask(cursor + depth);
    const auto [i, w] = looked_at[cursor % ahead];
    if (cursor + ahead < end) look(cursor + ahead);
    const entry& e = table[i];
    if (e.st() == entry_state::doomed) doomed.push_back(i);
    if (e.st() != entry_state::at_rest || heap.serial_of(w) >= serial) {
      ++idle;  // unused, freed, pinned, or placed since the pass began
      continue;
    }
    moves.push_back(i);
    sources.push_back(w);
    reqs.push_back({stored_bytes(e), e.alignment()});
    planned += stored_bytes(e);
  }
  dest.resize(moves.size());
  heap.place_all(reqs, dest, starting);  // nothing changed if this throws

  pass.active = true;
  pass.order = order;
  pass.serial = serial;
  for (std::uint32_t i : doomed) {
    heap.vacate(table[i].data, stored_bytes(table[i]));
    table.recycle(i);
    --counters.pending_free_entries;
  }
  // A source arena cannot go back before its last move: the where of each stays valid.
  for (std::size_t k = 0; k < moves.size(); ++k) {
    entry& e = table[moves[k]];
    const std::size_t n = stored_bytes(e);
    std::memcpy(dest[k], e.data, n);
    heap.vacate(e.data, n, sources[k]);
    e.data = dest[k];
    counters.bytes_moved += n;
  }
  pass.cursor = cursor;
  if (cursor == order.size()) {
    pass.active = false;
    heap.release_empty_older(serial);
    ++counters.shuffles;
  }
}

void shuffler::impl::relocate(std::uint32_t i) noexcept {
  if (full_active()) return;  // the heap is held: the entry moves with the shuffle
  entry& e = table[i];
  const std::size_t n = stored_bytes(e);
  std::byte* to = nullptr;
  try {
    to = heap.place(n, e.alignment());
  } catch (...) {
    return;
  }
  std::memcpy(to, e.data, n);
  heap.vacate(e.data, n);
  e.data = to;
  counters.bytes_moved += n;
  ++counters.entries_relocated_on_return;
}

}  // namespace memshuffle
