// permute: x_TD, idx_TK -> x_PD (expert-contiguous rows), pos_TK, with no host sync.
//
// Destination of copy i = t * K + k routed to expert e:
//   pos[i] = seg_start[e] + #{i' < i : idx[i'] = e}       seg_start = exclusive_cumsum(round_up(counts, pad))
// computed in three short passes over the N = T * K ids, split into chunks of `plan.chunk` ids:
//   1. chunk_histogram   one warp per chunk: hist[e, c] = #{i in chunk c : idx[i] = e}
//   2. chunk_scan        one warp per expert: hist[e, c] <- sum_{c' < c} hist[e, c'];  counts[e] = total
//      segment_starts    one block: seg_start = exclusive_cumsum(round_up(counts, pad))
//   3. assign_positions  one warp per chunk, 32 ids per step: __match_any_sync groups equal ids, a lane's
//                        rank among them is the popcount of lower lanes; a per-warp counter per expert
//                        carries the running position across steps (stable: (token, k) order).
// Then scatter_rows reads each token row once and writes its K copies with 16-byte accesses, and rows
// no copy landed on (padding, and the tail past the last segment) are zeroed.
#include <algorithm>

#include "common/cuda_helpers.cuh"
#include "moe_permute/moe_permute.h"

namespace r1core {
namespace {

constexpr int kIndexWarps = 4;

__device__ __forceinline__ int expert_or_minus1(const int64_t* idx, int64_t i, int64_t hi, int E) {
  if (i >= hi) return -1;
  const int64_t v = idx[i];
  return v >= 0 && v < E ? int(v) : -1;
}

__global__ void __launch_bounds__(kIndexWarps * 32)
chunk_histogram(const int64_t* __restrict__ idx, int64_t N, int E, int64_t chunk, int n_chunks, int* __restrict__ hist) {
  extern __shared__ int sh[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = blockIdx.x * kIndexWarps + warp;
  if (c >= n_chunks) return;  // warp-uniform; no block barrier follows
  int* h = sh + warp * E;
  for (int e = lane; e < E; e += 32) h[e] = 0;
  __syncwarp();
  const int64_t lo = c * chunk, hi = lo + chunk < N ? lo + chunk : N;
  for (int64_t base = lo; base < hi; base += 32) {
    const int e = expert_or_minus1(idx, base + lane, hi, E);
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) h[e] += __popc(peers);
    __syncwarp();
  }
  for (int e = lane; e < E; e += 32) hist[int64_t(e) * n_chunks + c] = h[e];
}

__global__ void __launch_bounds__(kIndexWarps * 32)
chunk_scan(int* __restrict__ hist, int E, int n_chunks, int* __restrict__ counts) {
  const int lane = threadIdx.x % 32;
  const int e = blockIdx.x * kIndexWarps + threadIdx.x / 32;
  if (e >= E) return;
  int* row = hist + int64_t(e) * n_chunks;
  int running = 0;
  for (int base = 0; base < n_chunks; base += 32) {
    const int c = base + lane;
    const int v = c < n_chunks ? row[c] : 0;
    int incl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(kFullMask, incl, off);
      if (lane >= off) incl += n;
    }
    if (c < n_chunks) row[c] = running + incl - v;
    running += __shfl_sync(kFullMask, incl, 31);
  }
  if (lane == 0) counts[e] = running;
}

// One block of kPermuteMaxExperts threads: seg_start[e] = sum_{e' < e} round_up(counts[e'], pad).
__global__ void __launch_bounds__(kPermuteMaxExperts)
segment_starts(const int* __restrict__ counts, int E, int pad, int* __restrict__ seg_start) {
  __shared__ int warp_total[kPermuteMaxExperts / 32];
  const int e = threadIdx.x, lane = e % 32, warp = e / 32;
  const int v = e < E ? (counts[e] + pad - 1) / pad * pad : 0;
  int incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int n = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int t = warp_total[lane];
    int tincl = t;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(kFullMask, tincl, off);
      if (lane >= off) tincl += n;
    }
    warp_total[lane] = tincl - t;  // exclusive prefix of the warp totals
  }
  __syncthreads();
  const int excl = warp_total[warp] + incl - v;
  if (e < E) seg_start[e] = excl;
  if (e == E - 1) seg_start[E] = excl + v;
}

__global__ void __launch_bounds__(kIndexWarps * 32)
assign_positions(const int64_t* __restrict__ idx, int64_t N, int E, int64_t chunk, int n_chunks,
                 const int* __restrict__ hist_scan, const int* __restrict__ seg_start,
                 int64_t* __restrict__ pos, uint8_t* __restrict__ mark) {
  extern __shared__ int sh[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = blockIdx.x * kIndexWarps + warp;
  if (c >= n_chunks) return;
  int* next = sh + warp * E;  // next free row of each expert for this chunk
  for (int e = lane; e < E; e += 32) next[e] = seg_start[e] + hist_scan[int64_t(e) * n_chunks + c];
  __syncwarp();
  const int64_t lo = c * chunk, hi = lo + chunk < N ? lo + chunk : N;
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int64_t base = lo; base < hi; base += 32) {
    const int64_t i = base + lane;
    const int e = expert_or_minus1(idx, i, hi, E);
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0) {
      const int p = next[e] + __popc(peers & lower_lanes);
      pos[i] = p;
      mark[p] = 1;
    } else if (i < hi) {
      pos[i] = -1;  // invalid expert id: the copy is dropped
    }
    __syncwarp();  // every peer has read next[e] before the leader advances it
    if (e >= 0 && lane == __ffs(peers) - 1) next[e] += __popc(peers);
    __syncwarp();
  }
}

constexpr int kRowThreads = 256;
constexpr int kUnroll = 4;

// Reads each token row once, writes it to its K destinations.
template <typename V>
__global__ void __launch_bounds__(kRowThreads)
scatter_rows(const V* __restrict__ x, V* __restrict__ out, const int64_t* __restrict__ pos, int64_t T, int K,
             int64_t n_vec, int64_t P, int team) {
  extern __shared__ int64_t spos[];  // [tokens per block, K]
  const int slot = threadIdx.x / team, sub = threadIdx.x % team;
  const int64_t t = int64_t(blockIdx.x) * (kRowThreads / team) + slot;
  int64_t* my_pos = spos + slot * K;
  for (int k = sub; k < K; k += team) {
    const int64_t p = t < T ? pos[t * K + k] : -1;
    my_pos[k] = p >= 0 && p < P ? p : -1;
  }
  __syncthreads();
  if (t >= T) return;
  const V* src = x + t * n_vec;
  for (int64_t v0 = sub; v0 < n_vec; v0 += int64_t(team) * kUnroll) {
    V buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + int64_t(u) * team;
      if (v < n_vec) buf[u] = src[v];
    }
    for (int k = 0; k < K; ++k) {
      const int64_t p = my_pos[k];
      if (p < 0) continue;
      V* dst = out + p * n_vec;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * team;
        if (v < n_vec) dst[v] = buf[u];
      }
    }
  }
}

// One warp per 32 rows: a ballot finds the unmarked ones (none at all when pad_multiple == 1).
template <typename V>
__global__ void __launch_bounds__(kRowThreads)
zero_unmarked(V* __restrict__ out, const uint8_t* __restrict__ mark, int64_t P, int64_t n_vec) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * kRowThreads + threadIdx.x) / 32;
  const int64_t n_warps = int64_t(gridDim.x) * kRowThreads / 32;
  for (int64_t r0 = warp * 32; r0 < P; r0 += n_warps * 32) {
    const int64_t r = r0 + lane;
    unsigned todo = __ballot_sync(kFullMask, r < P && mark[r] == 0);
    while (todo) {
      const int b = __ffs(todo) - 1;
      todo &= todo - 1;
      V* row = out + (r0 + b) * n_vec;
      for (int64_t v = lane; v < n_vec; v += 32) row[v] = zero_bytes<V>();
    }
  }
}

template <typename V>
cudaError_t launch_scatter(const PermuteArgs& a, cudaStream_t stream) {
  const int64_t n_vec = a.row_bytes / int64_t(sizeof(V));
  const int team = team_size(n_vec, kRowThreads);
  const int64_t blocks = ceil_div(a.n_tokens, kRowThreads / team);
  const size_t smem = sizeof(int64_t) * (kRowThreads / team) * a.top_k;
  scatter_rows<V><<<blocks, kRowThreads, smem, stream>>>(static_cast<const V*>(a.x), static_cast<V*>(a.x_out),
                                                         a.pos, a.n_tokens, a.top_k, n_vec, a.n_rows, team);
  return cudaGetLastError();
}

template <typename V>
cudaError_t launch_zero(void* out, int64_t row_bytes, const uint8_t* mark, int64_t P, cudaStream_t stream) {
  const int64_t n_vec = row_bytes / int64_t(sizeof(V));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(P, kRowThreads), current_sm_count() * 8));
  zero_unmarked<V><<<blocks, kRowThreads, 0, stream>>>(static_cast<V*>(out), mark, P, n_vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_zero_unmarked_rows(void* out, int64_t row_bytes, const uint8_t* mark, int64_t n_rows,
                                      cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  switch (widest_access(row_bytes, {out})) {
    case 16: return launch_zero<uint4>(out, row_bytes, mark, n_rows, stream);
    case 8: return launch_zero<uint2>(out, row_bytes, mark, n_rows, stream);
    case 4: return launch_zero<uint32_t>(out, row_bytes, mark, n_rows, stream);
    case 2: return launch_zero<uint16_t>(out, row_bytes, mark, n_rows, stream);
  }
  return cudaErrorMisalignedAddress;
}

cudaError_t launch_moe_permute(const PermuteArgs& a, cudaStream_t stream) {
  const PermutePlan& plan = a.plan;
  const int E = a.n_experts;
  if (E < 1 || E > kPermuteMaxExperts || a.top_k < 1 || a.pad_multiple < 1) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(a.workspace);
  int* hist = reinterpret_cast<int*>(ws + plan.hist_offset);
  int* counts = reinterpret_cast<int*>(ws + plan.counts_offset);
  int* seg_start = reinterpret_cast<int*>(ws + plan.seg_offset);
  uint8_t* mark = reinterpret_cast<uint8_t*>(ws + plan.mark_offset);
  cudaError_t err = cudaMemsetAsync(mark, 0, size_t(a.n_rows), stream);
  if (err != cudaSuccess) return err;

  if (plan.n_entries > 0) {
    const size_t warp_smem = sizeof(int) * kIndexWarps * E;
    const int chunk_blocks = int(ceil_div(plan.n_chunks, kIndexWarps));
    chunk_histogram<<<chunk_blocks, kIndexWarps * 32, warp_smem, stream>>>(a.idx, plan.n_entries, E, plan.chunk,
                                                                           plan.n_chunks, hist);
    chunk_scan<<<int(ceil_div(E, kIndexWarps)), kIndexWarps * 32, 0, stream>>>(hist, E, plan.n_chunks, counts);
    segment_starts<<<1, kPermuteMaxExperts, 0, stream>>>(counts, E, a.pad_multiple, seg_start);
    assign_positions<<<chunk_blocks, kIndexWarps * 32, warp_smem, stream>>>(
        a.idx, plan.n_entries, E, plan.chunk, plan.n_chunks, hist, seg_start, a.pos, mark);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    switch (widest_access(a.row_bytes, {a.x, a.x_out})) {
      case 16: err = launch_scatter<uint4>(a, stream); break;
      case 8: err = launch_scatter<uint2>(a, stream); break;
      case 4: err = launch_scatter<uint32_t>(a, stream); break;
      case 2: err = launch_scatter<uint16_t>(a, stream); break;
      default: return cudaErrorMisalignedAddress;
    }
    if (err != cudaSuccess) return err;
  }
  return launch_zero_unmarked_rows(a.x_out, a.row_bytes, mark, a.n_rows, stream);
}

}  // namespace r1core
