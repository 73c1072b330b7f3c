// CRC-32C (Castagnoli, iSCSI / RFC 3720): the checksum of every snapshot
// block. Uses the SSE4.2 crc32 instruction when the CPU has it, else a
// table-driven software version; both give identical results.
#ifndef KVC_SRC_CRC32C_H_
#define KVC_SRC_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace kvc {

// The CRC-32C of `bytes` bytes at `data`, continuing from `crc` (the CRC of
// what came before; 0 to start): Crc32c(ab) == Crc32c(b, Crc32c(a)).
uint32_t Crc32c(const void* data, size_t bytes, uint32_t crc = 0);

// The software version, always (tests compare it with the dispatched one).
uint32_t Crc32cPortable(const void* data, size_t bytes, uint32_t crc = 0);

// Whether Crc32c uses the hardware instruction on this machine.
bool Crc32cUsesHardware();

}  // namespace kvc

#endif  // KVC_SRC_CRC32C_H_
