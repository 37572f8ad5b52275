// unpermute (combine) and its backward; also permute's backward (the same gather-sum with unit weights).
//
//   forward   y_TD[t]          = sum_k w[t, k] * y_PD[pos[t, k]]          fp32 accumulate, k in order
//   backward  grad_y[pos[t, k]] = w[t, k] * g[t]                           rows no token reads: 0
//             grad_w[t, k]      = sum_d g[t, d] * y_PD[pos[t, k], d]       fp32
//
// Backward: token-major, a team of threads owns one token, so g[t] and the output row are touched once
// while the K source rows stream through with 16-byte loads (8 in flight per thread).
#include <algorithm>

#include "common/cuda_helpers.cuh"
#include "moe_permute/moe_permute.h"

namespace r1core {
namespace {

constexpr int kThreads = 256;
constexpr int kBatch = 4;  // backward: source rows loaded before they are consumed (8 held 128 registers: 2 blocks per SM)

// Loads this token's K positions (-1 when outside [0, P)) and weights into shared memory.
__device__ __forceinline__ void stage_token(const int64_t* pos, const float* w, int64_t t, int64_t T, int K,
                                            int64_t P, int sub, int team, int64_t* my_pos, float* my_w) {
  for (int k = sub; k < K; k += team) {
    const int64_t p = t < T ? pos[t * K + k] : -1;
    my_pos[k] = p >= 0 && p < P ? p : -1;
    my_w[k] = w != nullptr && t < T ? w[t * K + k] : 1.f;
  }
}

// Forward: one warp per (token, chunk of 32 vectors of its row), kThreads / 32 tokens per block and a grid
// column per chunk; a lane holds the positions and weights of up to 32 copies and hands them out by
// shuffle. Registers bound this kernel, not the loads in flight: at V3 shapes (bf16, D 7168, K 8) one
// 16-byte vector per lane and batches of 4 rows (80 registers, 3 blocks per SM) run at 2.8 TB/s, while
// 2 vectors x 8 rows (196 registers, 1 block per SM) or a block per token ran at 1.5 TB/s (scratch
// variants timed on an H100, benchmarks/RESULTS.md section 2).
constexpr int kChunkVecs = 32;
constexpr int kFwdBatch = 4;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
unpermute_kernel(const T* __restrict__ y, const int64_t* __restrict__ pos, const float* __restrict__ w,
                 T* __restrict__ out, int64_t n_tokens, int K, int64_t n_vec, int64_t P) {
  using V = Vec<T, VEC>;
  const int lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (t >= n_tokens) return;  // warp-uniform
  const int64_t v = int64_t(blockIdx.y) * kChunkVecs + lane;
  const bool v_ok = v < n_vec;
  const V* rows = reinterpret_cast<const V*>(y);
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
  for (int kk = 0; kk < K; kk += 32) {
    int64_t my_p = -1;
    float my_w = 1.f;
    if (kk + lane < K) {
      const int64_t p = pos[t * K + kk + lane];
      my_p = p >= 0 && p < P ? p : -1;
      if (w != nullptr) my_w = w[t * K + kk + lane];
    }
    const int n = K - kk < 32 ? K - kk : 32;
    for (int k0 = 0; k0 < n; k0 += kFwdBatch) {
      V buf[kFwdBatch];
      int64_t p[kFwdBatch];
      float wk[kFwdBatch];
#pragma unroll
      for (int j = 0; j < kFwdBatch; ++j) {
        p[j] = __shfl_sync(kFullMask, my_p, (k0 + j) & 31);
        wk[j] = __shfl_sync(kFullMask, my_w, (k0 + j) & 31);
        if (k0 + j >= n) p[j] = -1;
      }
#pragma unroll
      for (int j = 0; j < kFwdBatch; ++j) {
        if (p[j] >= 0 && v_ok) buf[j] = rows[p[j] * n_vec + v];
      }
#pragma unroll
      for (int j = 0; j < kFwdBatch; ++j) {
        if (p[j] < 0) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = __fadd_rn(acc[e], __fmul_rn(to_float(buf[j].v[e]), wk[j]));
      }
    }
  }
  if (!v_ok) return;
  V o;
#pragma unroll
  for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(acc[e]);
  reinterpret_cast<V*>(out)[t * n_vec + v] = o;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
unpermute_backward_kernel(const T* __restrict__ g, const T* __restrict__ y, const int64_t* __restrict__ pos,
                          const float* __restrict__ w, T* __restrict__ grad_y, float* __restrict__ grad_w,
                          uint8_t* __restrict__ mark, int64_t n_tokens, int K, int64_t n_vec, int64_t P, int team) {
  using V = Vec<T, VEC>;
  extern __shared__ unsigned char smem_raw[];
  const int tpb = kThreads / team, slot = threadIdx.x / team, sub = threadIdx.x % team, lane = threadIdx.x % 32;
  int64_t* my_pos = reinterpret_cast<int64_t*>(smem_raw) + slot * K;
  float* my_w = reinterpret_cast<float*>(reinterpret_cast<int64_t*>(smem_raw) + tpb * K) + slot * K;
  float* my_dot = reinterpret_cast<float*>(reinterpret_cast<int64_t*>(smem_raw) + tpb * K) + tpb * K + slot * K;
  const int64_t t = int64_t(blockIdx.x) * tpb + slot;
  stage_token(pos, w, t, n_tokens, K, P, sub, team, my_pos, my_w);
  for (int k = sub; k < K; k += team) my_dot[k] = 0.f;
  __syncthreads();
  const bool live = t < n_tokens;  // dead slots still reach the barrier below
  if (live && grad_y != nullptr) {
    for (int k = sub; k < K; k += team) {
      if (my_pos[k] >= 0) mark[my_pos[k]] = 1;
    }
  }
  const V* g_row = reinterpret_cast<const V*>(g) + (live ? t : 0) * n_vec;
  for (int k0 = 0; k0 < K; k0 += kBatch) {
    float part[kBatch];
    unsigned ok = 0;  // bit j: copy k0 + j exists (a bitmask, not 8 live predicates: those would spill)
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      part[j] = 0.f;
      if (k0 + j < K && my_pos[k0 + j] >= 0) ok |= 1u << j;
    }
    for (int64_t v = sub; live && v < n_vec; v += team) {
      const V gv = g_row[v];
      float gf[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) gf[e] = to_float(gv.v[e]);
      V buf[kBatch];
      if (grad_w != nullptr) {
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          if ((ok >> j) & 1u) buf[j] = reinterpret_cast<const V*>(y)[my_pos[k0 + j] * n_vec + v];
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        if (!((ok >> j) & 1u)) continue;
        const int k = k0 + j;
        if (grad_y != nullptr) {
          V o;
#pragma unroll
          for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(__fmul_rn(gf[e], my_w[k]));
          reinterpret_cast<V*>(grad_y)[my_pos[k] * n_vec + v] = o;
        }
        if (grad_w != nullptr) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) part[j] = fmaf(gf[e], to_float(buf[j].v[e]), part[j]);
        }
      }
    }
    if (grad_w != nullptr) {
      // team >= 32 and a multiple of 32: every warp lies inside one token's team.
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        float s = part[j];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
        if (lane == 0 && live && k0 + j < K) atomicAdd(my_dot + k0 + j, s);
      }
    }
  }
  if (grad_w == nullptr) return;
  __syncthreads();
  if (!live) return;
  for (int k = sub; k < K; k += team) grad_w[t * K + k] = my_dot[k];
}

template <typename T, int VEC>
cudaError_t launch_forward(const UnpermuteArgs& a, cudaStream_t stream) {
  const int64_t n_vec = a.dim / VEC;
  const dim3 grid(unsigned(ceil_div(a.n_tokens, kThreads / 32)), unsigned(ceil_div(n_vec, kChunkVecs)));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  unpermute_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a.y), a.pos, a.weights,
                                                          static_cast<T*>(a.out), a.n_tokens, a.top_k, n_vec,
                                                          a.n_rows);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_backward(const UnpermuteBackwardArgs& a, cudaStream_t stream) {
  const int64_t n_vec = a.dim / VEC;
  const int team = team_size(n_vec, kThreads);
  const int tpb = kThreads / team;
  const size_t smem = (sizeof(int64_t) + 2 * sizeof(float)) * size_t(tpb) * a.top_k;
  unpermute_backward_kernel<T, VEC><<<ceil_div(a.n_tokens, tpb), kThreads, smem, stream>>>(
      static_cast<const T*>(a.grad_out), static_cast<const T*>(a.y), a.pos, a.weights, static_cast<T*>(a.grad_y),
      a.grad_w, a.mark, a.n_tokens, a.top_k, n_vec, a.n_rows, team);
  return cudaGetLastError();
}

// 16-byte accesses when the row size and every base pointer allow it, else one element at a time.
template <typename T, typename Args, typename Launch16, typename Launch1>
cudaError_t dispatch_vec(const Args& a, std::initializer_list<const void*> ptrs, Launch16 fast, Launch1 slow) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = widest_access(a.dim * int64_t(sizeof(T)), ptrs) == 16;
  return aligned ? fast(std::integral_constant<int, kVec>{}) : slow(std::integral_constant<int, 1>{});
}

template <typename T>
cudaError_t forward_typed(const UnpermuteArgs& a, cudaStream_t s) {
  auto go = [&](auto vec) { return launch_forward<T, decltype(vec)::value>(a, s); };
  return dispatch_vec<T>(a, {a.y, a.out}, go, go);
}

template <typename T>
cudaError_t backward_typed(const UnpermuteBackwardArgs& a, cudaStream_t s) {
  auto go = [&](auto vec) { return launch_backward<T, decltype(vec)::value>(a, s); };
  return dispatch_vec<T>(a, {a.grad_out, a.y, a.grad_y}, go, go);
}

}  // namespace

cudaError_t launch_moe_unpermute(const UnpermuteArgs& a, cudaStream_t stream) {
  if (a.n_tokens == 0 || a.dim == 0) return cudaSuccess;
  if (a.top_k < 1) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return forward_typed<float>(a, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return forward_typed<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_moe_unpermute_backward(const UnpermuteBackwardArgs& a, cudaStream_t stream) {
  if (a.top_k < 1 || (a.grad_y != nullptr && a.mark == nullptr)) return cudaErrorInvalidValue;
  if (a.grad_y != nullptr) {
    cudaError_t err = cudaMemsetAsync(a.mark, 0, size_t(a.n_rows), stream);
    if (err != cudaSuccess) return err;
  }
  if (a.n_tokens > 0 && a.dim > 0) {
    cudaError_t err;
    switch (a.dtype) {
      case DType::kFloat32: err = backward_typed<float>(a, stream); break;
      case DType::kBFloat16: err = backward_typed<__nv_bfloat16>(a, stream); break;
      case DType::kFloat16: err = backward_typed<__half>(a, stream); break;
      default: return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  if (a.grad_y == nullptr) return cudaSuccess;
  return launch_zero_unmarked_rows(a.grad_y, a.dim * int64_t(dtype_size(a.dtype)), a.mark, a.n_rows, stream);
}

}  // namespace r1core
