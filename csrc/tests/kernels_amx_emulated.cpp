// The AMX kernels on emulated tiles and SIMDe's AVX-512 (no -mamx* / -mavx512* flags): see amx_emulation.h.
#define BITNET_AMX_EMULATE
#define BITNET_HAVE_AVX512_EMULATED
#define BITNET_HAVE_AMX_EMULATED
#include "cpu/kernels_amx.cpp"
