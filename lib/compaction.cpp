// The policies' compaction (docs/design.md, "Shuffle policies"): the sources, the
// sparsest arenas or all of them, are emptied into the arena being filled and given
// back whole. Runs under the shuffler's lock.
#include <algorithm>
#include <chrono>
#include <cstring>

#include "shuffler_impl.hpp"

namespace memshuffle {

void shuffler::impl::compact(compact_scope scope) {
  if (full_active()) return;  // a full shuffle under way does more
  const shuffle_timer timer{counters};
  // Everything that can fail before the first move comes first: nothing changed then.
  tally_arenas();
  choose_sources(scope);
  list_moves();
  // Every entry moves out of a source, even out of the arena being filled.
  if (scope == compact_scope::every) heap.stop_filling();
  auto& c = compacting;
  for (const auto& f : c.freed)
    if (c.arenas[f.arena].source == 0) drop_freed(f.slot, f.arena);
  empty_sources();
  ++counters.shuffles;
}

// One walk over the slots: by arena, the bytes at rest and whether an entry is pinned;
// the entries at rest and the freed ones with their arena numbers.
void shuffler::impl::tally_arenas() {
  auto& c = compacting;
  heap.index_arenas();
  const auto arenas = static_cast<std::uint32_t>(heap.arenas());
  c.arenas.assign(arenas, {});
  c.at_rest.clear(), c.freed.clear();
  c.at_rest.reserve(counters.live_entries);
  c.freed.reserve(counters.pending_free_entries);
  for (std::uint32_t i = 0; i < table.slots(); ++i) {
    const entry& e = table[i];
    const entry_state st = e.st();
    if (st == entry_state::unused) continue;
    const std::uint32_t a = heap.arena_number(e.data);
    auto& t = c.arenas[a];
    if (st == entry_state::at_rest) {
      c.at_rest.push_back({e.data, stored_bytes(e), i, a});
      t.bytes += stored_bytes(e);
      ++t.at_rest;
    } else if (st == entry_state::doomed) {
      c.freed.push_back({i, a});
      ++t.freed;
    } else {
      t.pinned = true;  // rented, or in transition: its arena stays
    }
  }
  c.where.resize(arenas);
  for (std::uint32_t a = 0; a < arenas; ++a) c.where[a] = heap.at(a);
}

// sparsest: by bytes at rest over bytes held, the emptiest first, until reserved is
// projected below the aim; an arena with nothing at rest costs nothing and always
// goes. The arena being filled and arenas holding a pinned entry are never sources.
void shuffler::impl::choose_sources(compact_scope scope) {
  auto& c = compacting;
  c.sources.clear();
  const auto arenas = static_cast<std::uint32_t>(c.arenas.size());
  if (scope == compact_scope::every) {
    for (std::uint32_t a = 0; a < arenas; ++a) c.sources.push_back(a);
  } else {
    c.by_share.clear();
    for (std::uint32_t a = 0; a < arenas; ++a)
      if (!c.arenas[a].pinned && !heap.filling(a))
        c.by_share.push_back({static_cast<float>(c.arenas[a].bytes) / static_cast<float>(heap.chunk_bytes(a)), a});
    std::sort(c.by_share.begin(), c.by_share.end());
    for (const auto& s : c.by_share) c.sources.push_back(s.second);
    const double stored = static_cast<double>(counters.live_bytes + counters.live_entries * tag_bytes);
    const double allowance = std::max(opt.shuffle_above_ratio - 1, 0.0) * stored;
    const double aim = stored + compaction_aim * allowance;
    auto reserved = static_cast<double>(heap.reserved_bytes());
    std::size_t taken = 0;
    for (; taken < c.sources.size(); ++taken) {
      const auto& t = c.arenas[c.sources[taken]];
      if (t.bytes != 0 && reserved <= aim) break;
      // The arena goes back; its entries take as many bytes elsewhere.
      reserved -= static_cast<double>(heap.chunk_bytes(c.sources[taken]) - t.bytes);
    }
    c.sources.resize(taken);
  }
  // The order the sources are emptied in: at random, or the order they were filled in.
  if (opt.randomize_layout) {
    detail::shuffle_range(std::span(c.sources), rng);
  } else {
    std::sort(c.sources.begin(), c.sources.end(),
              [&](std::uint32_t x, std::uint32_t y) { return heap.serial_at(x) < heap.serial_at(y); });
  }
  for (std::uint32_t k = 0; k < c.sources.size(); ++k) {
    auto& t = c.arenas[c.sources[k]];
    t.source = k + 1;
    // The count check keeps an arena whose entries the walk did not all see.
    t.whole = !t.pinned && t.at_rest + t.freed == heap.entries_in(c.sources[k]);
  }
}

// The sources' entries at rest to moving and their freed slots to dropping, each
// source's run in the sources' order (a counting sort on the source).
void shuffler::impl::list_moves() {
  auto& c = compacting;
  const std::size_t n = c.sources.size();
  c.first_move.assign(n + 1, 0), c.first_freed.assign(n + 1, 0);
  for (std::size_t k = 0; k < n; ++k) {
    const auto& t = c.arenas[c.sources[k]];
    c.first_move[k + 1] = c.first_move[k] + t.at_rest;
    c.first_freed[k + 1] = c.first_freed[k] + t.freed;
  }
  c.moving.resize(c.first_move[n]);
  c.dropping.resize(c.first_freed[n]);
  // The runs fill from their ends down, so each start is right once they are full.
  for (auto it = c.at_rest.rbegin(); it != c.at_rest.rend(); ++it) {
    auto& t = c.arenas[it->arena];
    if (t.source != 0) c.moving[c.first_move[t.source - 1] + --t.at_rest] = *it;
  }
  for (auto it = c.freed.rbegin(); it != c.freed.rend(); ++it) {
    auto& t = c.arenas[it->arena];
    if (t.source != 0) c.dropping[c.first_freed[t.source - 1] + --t.freed] = it->slot;
  }
  if (!opt.randomize_layout) {  // each source's entries in address order
    for (std::size_t k = 0; k < n; ++k)
      std::sort(c.moving.begin() + c.first_move[k], c.moving.begin() + c.first_move[k + 1],
                [](const auto& x, const auto& y) { return x.src < y.src; });
  }
}

// A freed entry of an arena that stays: its bytes wiped, its slot recycled.
void shuffler::impl::drop_freed(std::uint32_t slot, std::uint32_t arena) noexcept {
  heap.vacate(table[slot].data, stored_bytes(table[slot]), compacting.where[arena]);
  table.recycle(slot);
  --counters.pending_free_entries;
}

// The freed entries of source k: with its chunk, or one by one when it stays.
void shuffler::impl::drop_freed_of(std::size_t k, bool whole) noexcept {
  auto& c = compacting;
  const std::uint32_t a = c.sources[k];
  for (std::uint32_t f = c.first_freed[k]; f < c.first_freed[k + 1]; ++f) {
    if (whole) table.recycle(c.dropping[f]);
    else drop_freed(c.dropping[f], a);
  }
  if (whole) counters.pending_free_entries -= c.first_freed[k + 1] - c.first_freed[k];
}

void shuffler::impl::empty_sources() {
  auto& c = compacting;
  const std::size_t n = c.sources.size();
  std::size_t first = 0;
  try {
    while (first < n) {
      // A window: whole sources, about an arena's worth of bytes to move.
      std::size_t last = first, bytes = 0;
      do {
        bytes += c.arenas[c.sources[last++]].bytes;
      } while (last < n && bytes + c.arenas[c.sources[last]].bytes <= heap.arena_size());
      const std::span batch(c.moving.data() + c.first_move[first], c.first_move[last] - c.first_move[first]);
      if (opt.randomize_layout) detail::shuffle_range(batch, rng);
      reqs.clear();
      for (const auto& m : batch) reqs.push_back({m.bytes, table[m.slot].alignment()});
      dest.resize(batch.size());
      heap.place_all(reqs, dest, false);  // nothing changed if this throws
      for (std::size_t k = 0; k < batch.size(); ++k) {
        const auto& m = batch[k];
        std::memcpy(dest[k], m.src, m.bytes);
        table[m.slot].data = dest[k];
        counters.bytes_moved += m.bytes;
        // A source that stays (a pinned entry keeps it) is left one entry at a time.
        if (!c.arenas[m.arena].whole) heap.vacate(m.src, m.bytes, c.where[m.arena]);
      }
      for (std::size_t k = first; k < last; ++k) {
        const std::uint32_t a = c.sources[k];
        drop_freed_of(k, c.arenas[a].whole);
        if (c.arenas[a].whole) heap.drop(c.where[a]);  // wiped whole, freed bytes too
      }
      first = last;
    }
  } catch (...) {
    // Without memory the sources left keep their entries; their freed ones still go.
    for (std::size_t k = first; k < n; ++k) drop_freed_of(k, false);
    throw;
  }
}

}  // namespace memshuffle
