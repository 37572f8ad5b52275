// Device helpers shared by the MoE kernels: dtype conversion and the vector types behind 16-byte accesses.
// Torch builds extensions with -D__CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__, so every conversion is explicit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "common/moe_common.h"

namespace r1core {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round to nearest even, as torch's .to(dtype) does.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// N elements of T loaded/stored as one access (N * sizeof(T) = 16 bytes on the fast path).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Raw byte vectors for dtype-agnostic row copies.
template <int B> struct Bytes;
template <> struct Bytes<16> { using type = uint4; };
template <> struct Bytes<8> { using type = uint2; };
template <> struct Bytes<4> { using type = uint32_t; };
template <> struct Bytes<2> { using type = uint16_t; };

template <typename V> __device__ __forceinline__ V zero_bytes();
template <> __device__ __forceinline__ uint4 zero_bytes<uint4>() { return make_uint4(0u, 0u, 0u, 0u); }
template <> __device__ __forceinline__ uint2 zero_bytes<uint2>() { return make_uint2(0u, 0u); }
template <> __device__ __forceinline__ uint32_t zero_bytes<uint32_t>() { return 0u; }
template <> __device__ __forceinline__ uint16_t zero_bytes<uint16_t>() { return 0; }

// Widest access (16, 8, 4 or 2 bytes) that divides the row size and every pointer's alignment.
inline int widest_access(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int b = 16; b >= 2; b /= 2) {
    bool ok = row_bytes % b == 0;
    for (const void* p : ptrs) ok = ok && (reinterpret_cast<uintptr_t>(p) % b == 0);
    if (ok) return b;
  }
  return 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per token for the token-major row kernels: about four accesses per thread, 32..max_team
// threads (whole warps, so a warp never spans two tokens).
inline int team_size(int64_t n_access, int max_team) {
  int team = 32;
  while (team < max_team && int64_t(team) * 4 < n_access) team *= 2;
  return team;
}

}  // namespace r1core
