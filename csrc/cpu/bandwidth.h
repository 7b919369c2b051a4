// The roofline's denominator: how fast this machine streams memory into the cores.
#pragma once

#include <cstdint>
#include <string>

namespace bitnet {

// Best of `repeats` passes over [data, data + bytes): every one of `threads` threads reads its
// contiguous share with the widest vector loads `isa` allows ("scalar": 16-byte SSE2 loads on
// x86), into independent accumulators; returns the seconds of the fastest pass. `checksum` gets a
// value that depends on every byte (so no pass can be optimized away).
double stream_read_seconds(const uint8_t* data, int64_t bytes, int threads, const std::string& isa, int repeats,
                           uint64_t* checksum);

}  // namespace bitnet
