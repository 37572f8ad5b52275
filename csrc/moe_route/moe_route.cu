// Group-limited top-k routing, one warp per token.
//
//   s = sigmoid(logits)  (or precomputed softmax scores)      c = s + bias            [E]
//   group score  = sum of the top-2 c in the group (sigmoid) | max c in the group (softmax)
//   keep the topk_groups best groups; c of the other groups = -inf
//   idx   = top-k of c, ties toward the lower index (groups and experts alike)
//   w     = s[idx] / (sum_k s[idx_k] + 1e-20) (when norm_topk_prob) * route_scale
//   counts[e] += #{(t, k) : idx[t, k] = e}
//
// Lane l holds experts l, l + 32, l + 64, ... (coalesced loads); every "top" is an argmax over
// (value desc, index asc), a total order, so all lanes agree on the winner of each round.
//
// Selection must be bit-identical to the PyTorch reference, or a 1-ulp difference flips a near tie
// and the routed indices differ. setup.py compiles with --use_fast_math, which would turn expf into
// __expf and `/` into an approximate divide, so the reference's arithmetic is spelled out below with
// rounding-explicit intrinsics and PTX that fast-math cannot rewrite.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <type_traits>

#include "common/cuda_helpers.cuh"
#include "moe_route/moe_route.h"

namespace r1core {
namespace {

constexpr int kWarps = 4;  // warps (tokens in flight) per block

// torch.sigmoid for fp32 on CUDA is `1.f / (1.f + std::exp(-a))` compiled without fast-math. This is
// the instruction sequence nvcc (CUDA 13, sm_90) emits for that expression: libdevice's expf with its
// last scaling multiply fused into the `1 +` (fma.rn), then an IEEE reciprocal (rcp.rn). Every op has an
// explicit rounding mode, so neither --use_fast_math nor ptxas contraction can change the result.
__device__ __forceinline__ float sigmoid_like_torch(float a) {
  float r;
  asm("{\n\t"
      ".reg .f32 n, t, s, j, jn, f, sc, e2, d;\n\t"
      ".reg .b32 bits;\n\t"
      "neg.f32 n, %1;\n\t"
      "fma.rn.f32 t, n, 0f3BBB989D, 0f3F000000;\n\t"
      "cvt.sat.f32.f32 s, t;\n\t"
      "fma.rm.f32 j, s, 0f437C0000, 0f4B400001;\n\t"
      "add.rn.f32 jn, j, 0fCB40007F;\n\t"
      "neg.f32 jn, jn;\n\t"
      "fma.rn.f32 f, n, 0f3FB8AA3B, jn;\n\t"
      "fma.rn.f32 f, n, 0f32A57060, f;\n\t"
      "mov.b32 bits, j;\n\t"
      "shl.b32 bits, bits, 23;\n\t"
      "mov.b32 sc, bits;\n\t"
      "ex2.approx.ftz.f32 e2, f;\n\t"
      "fma.rn.f32 d, e2, sc, 0f3F800000;\n\t"
      "rcp.rn.f32 %0, d;\n\t"
      "}"
      : "=f"(r)
      : "f"(a));
  return r;
}

// (v, i) beats (w, j) when v > w, or v == w and i < j: the order of a stable descending sort.
__device__ __forceinline__ bool beats(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

struct WarpScratch {
  float* choice;  // [32 * VPT] biased scores of the current token, by expert
  float* group;   // [G] group scores
  int* keep;      // [G] 1 when the group is among the topk_groups best
};

// Masks c[] to -inf outside the topk_groups best groups (ref: masked_fill of the dropped groups).
template <int VPT>
__device__ __forceinline__ void limit_groups(float (&c)[VPT], const RouteArgs& a, const WarpScratch& ws, int lane) {
  const int E = a.n_experts, G = a.n_groups, gs = E / G;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + 32 * j;
    if (e < E) ws.choice[e] = c[j];
  }
  __syncwarp();
  for (int g = lane; g < G; g += 32) {
    const float* v = ws.choice + g * gs;
    float m1 = -INFINITY, m2 = -INFINITY;  // the two largest values (topk(2).values)
    for (int i = 0; i < gs; ++i) {
      const float x = v[i];
      if (x > m1) {
        m2 = m1;
        m1 = x;
      } else if (x > m2) {
        m2 = x;
      }
    }
    ws.group[g] = a.group_score == GroupScore::kTop2Sum ? __fadd_rn(m1, m2) : m1;
  }
  __syncwarp();
  for (int g = lane; g < G; g += 32) {
    const float v = ws.group[g];
    int rank = 0;  // position of g in a stable descending sort of the group scores
    for (int h = 0; h < G; ++h) rank += beats(ws.group[h], h, v, g);
    ws.keep[g] = rank < a.topk_groups;
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + 32 * j;
    if (e < E && !ws.keep[e / gs]) c[j] = -INFINITY;
  }
  __syncwarp();  // the scratch is reused by the warp's next token
}

template <int VPT, typename TIn, bool kSigmoid>
__device__ __forceinline__ void route_token(const RouteArgs& a, int64_t t, const float (&bias)[VPT],
                                            const WarpScratch& ws, int* hist, int lane) {
  const int E = a.n_experts, K = a.top_k;
  const TIn* row = static_cast<const TIn*>(a.logits) + t * E;
  float s[VPT], c[VPT];
  uint32_t taken = 0;  // bit j: expert lane + 32 j is selected already, or does not exist
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + 32 * j;
    if (e < E) {
      const float x = to_float(row[e]);
      s[j] = kSigmoid ? sigmoid_like_torch(x) : x;
      c[j] = a.bias != nullptr ? __fadd_rn(s[j], bias[j]) : s[j];
    } else {
      s[j] = 0.f;
      c[j] = -INFINITY;
      taken |= 1u << j;
    }
  }
  if (a.n_groups > 1) limit_groups<VPT>(c, a, ws, lane);

  int my_idx = 0;    // lane k ends up holding the k-th choice
  float my_s = 0.f;
  for (int k = 0; k < K; ++k) {
    float bv = -INFINITY;
    int bi = INT_MAX;  // loses to every real candidate, -inf ones included
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (!((taken >> j) & 1u) && beats(c[j], lane + 32 * j, bv, bi)) {
        bv = c[j];
        bi = lane + 32 * j;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(kFullMask, bv, off);
      const int oi = __shfl_xor_sync(kFullMask, bi, off);
      if (beats(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (bi == INT_MAX) bi = 0;  // only NaN scores are never candidates: routing of such a row is unspecified
    const int owner = bi & 31, jw = bi >> 5;
    float sv = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) sv = j == jw ? s[j] : sv;  // no dynamic register indexing
    sv = __shfl_sync(kFullMask, sv, owner);
    if (lane == owner) taken |= 1u << jw;
    if (lane == k) {
      my_idx = bi;
      my_s = sv;
    }
  }

  float w = my_s;
  if (a.norm_topk_prob) {
    float sum = lane < K ? my_s : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum = __fadd_rn(sum, __shfl_xor_sync(kFullMask, sum, off));
    w = __fdiv_rn(my_s, __fadd_rn(sum, 1e-20f));
  }
  w = __fmul_rn(w, a.route_scale);
  if (lane < K) {
    a.weights[t * K + lane] = w;
    a.idx[t * K + lane] = my_idx;
    atomicAdd(hist + my_idx, 1);
  }
}

template <int VPT, typename TIn, bool kSigmoid>
__global__ void __launch_bounds__(kWarps * 32) moe_route_kernel(RouteArgs a) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int E = a.n_experts, G = a.n_groups > 1 ? a.n_groups : 0;
  // Block-local histogram first: one global atomic per (block, expert) instead of one per (token, k).
  int* hist = reinterpret_cast<int*>(smem);
  float* mine = smem + E + warp * (32 * VPT + 2 * G);
  const WarpScratch ws{mine, mine + 32 * VPT, reinterpret_cast<int*>(mine + 32 * VPT + G)};
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();

  float bias[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = lane + 32 * j;
    bias[j] = a.bias != nullptr && e < E ? a.bias[e] : 0.f;
  }
  for (int64_t t = int64_t(blockIdx.x) * kWarps + warp; t < a.n_tokens; t += int64_t(gridDim.x) * kWarps) {
    route_token<VPT, TIn, kSigmoid>(a, t, bias, ws, hist, lane);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    if (hist[e] != 0) atomicAdd(reinterpret_cast<unsigned long long*>(a.counts + e), (unsigned long long)hist[e]);
  }
}

template <int VPT, typename TIn>
cudaError_t launch_vpt(const RouteArgs& a, cudaStream_t stream) {
  const int G = a.n_groups > 1 ? a.n_groups : 0;
  const size_t smem = sizeof(float) * (a.n_experts + kWarps * (32 * VPT + 2 * G));
  // Persistent-style grid: enough warps to fill the GPU; the block histogram is flushed once per block.
  const int64_t blocks = std::min<int64_t>(ceil_div(a.n_tokens, kWarps), int64_t(current_sm_count()) * 8);
  if (a.score_mode == ScoreMode::kSigmoid) {
    moe_route_kernel<VPT, TIn, true><<<blocks, kWarps * 32, smem, stream>>>(a);
  } else if constexpr (std::is_same<TIn, float>::value) {  // precomputed scores are fp32
    moe_route_kernel<VPT, TIn, false><<<blocks, kWarps * 32, smem, stream>>>(a);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename TIn>
cudaError_t launch_dtype(const RouteArgs& a, cudaStream_t stream) {
  if (a.n_experts <= 32) return launch_vpt<1, TIn>(a, stream);
  if (a.n_experts <= 64) return launch_vpt<2, TIn>(a, stream);
  if (a.n_experts <= 128) return launch_vpt<4, TIn>(a, stream);
  if (a.n_experts <= 256) return launch_vpt<8, TIn>(a, stream);
  return launch_vpt<16, TIn>(a, stream);
}

}  // namespace

cudaError_t launch_moe_route(const RouteArgs& a, cudaStream_t stream) {
  if (a.n_tokens == 0) return cudaSuccess;
  if (a.n_experts < 1 || a.n_experts > kRouteMaxExperts || a.top_k < 1 || a.top_k > kRouteMaxTopK ||
      a.top_k > a.n_experts) {
    return cudaErrorInvalidValue;  // the binding checks these with messages; this guards direct callers
  }
  switch (a.logits_dtype) {
    case DType::kFloat32: return launch_dtype<float>(a, stream);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return launch_dtype<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace r1core
