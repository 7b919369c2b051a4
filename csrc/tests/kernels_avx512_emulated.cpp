// The AVX-512 kernels compiled on SIMDe (no -mavx512* flags): see avx512_emulation.h.
#define BITNET_AVX512_EMULATE
#define BITNET_HAVE_AVX512_EMULATED
#include "cpu/kernels_avx512.cpp"
