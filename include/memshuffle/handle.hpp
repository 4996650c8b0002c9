#pragma once
// A handle names one entry of one shuffler. It is opaque: inside are a slot index, a
// generation (bumped whenever the slot's entry is freed, so a stale handle is always
// caught) and a tag of the shuffler that made it (so a handle passed to another
// shuffler is caught too, however many shufflers the process makes). No handle a shuffler hands out equals invalid_handle.
#include <cstdint>

namespace memshuffle {

/// Names one entry of one shuffler; opaque.
enum class handle : std::uint64_t {};

/// Never names a live entry; a convenient "no entry" value.
inline constexpr handle invalid_handle{0xFFFF'FFFF};

}  // namespace memshuffle
