// Token permutation to expert-contiguous rows and back: the contracts of r1core.model.moe's
// permute_ref / unpermute_ref (segment layout in that module's docstring).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/moe_common.h"

namespace r1core {

// Device scratch of one permute call, carved from a single byte buffer the binding allocates.
struct PermutePlan {
  int64_t n_entries = 0;   // N = T * K routed copies
  int64_t chunk = 0;       // entries per chunk (one warp ranks one chunk)
  int n_chunks = 0;
  size_t hist_offset = 0;  // int32 [E, n_chunks]: per-chunk expert counts, then their exclusive scan
  size_t counts_offset = 0;  // int32 [E]
  size_t seg_offset = 0;   // int32 [E + 1]: segment starts; [E] = sum of padded segments
  size_t mark_offset = 0;  // uint8 [P]: 1 for rows that receive a token copy
  size_t bytes = 0;
};

inline PermutePlan plan_permute(int64_t n_entries, int n_experts, int64_t n_rows) {
  PermutePlan p;
  p.n_entries = n_entries;
  // ~256 chunks keeps both the per-chunk (rank) and the per-expert (scan) passes short.
  int64_t chunk = 256;
  while (chunk < 8192 && chunk * 256 < n_entries) chunk *= 2;
  p.chunk = chunk;
  p.n_chunks = int((n_entries + chunk - 1) / chunk);
  auto align = [](size_t x) { return (x + 255) / 256 * 256; };
  p.hist_offset = 0;
  p.counts_offset = align(p.hist_offset + sizeof(int32_t) * size_t(n_experts) * size_t(p.n_chunks));
  p.seg_offset = align(p.counts_offset + sizeof(int32_t) * size_t(n_experts));
  p.mark_offset = align(p.seg_offset + sizeof(int32_t) * size_t(n_experts + 1));
  p.bytes = align(p.mark_offset + size_t(n_rows));
  return p;
}

constexpr int kPermuteMaxExperts = 1024;

struct PermuteArgs {
  const void* x = nullptr;  // [T, row_bytes]
  void* x_out = nullptr;    // [P, row_bytes]
  int64_t row_bytes = 0;
  const int64_t* idx = nullptr;  // [T, K]
  int64_t* pos = nullptr;        // [T, K] out; -1 for an expert id outside [0, E)
  int64_t n_tokens = 0;
  int top_k = 0;
  int n_experts = 0;
  int pad_multiple = 1;
  int64_t n_rows = 0;  // P
  void* workspace = nullptr;
  PermutePlan plan;
};

cudaError_t launch_moe_permute(const PermuteArgs& args, cudaStream_t stream);

// y_TD[t] = sum_k w[t, k] * y_PD[pos[t, k]] (fp32 accumulate); w == nullptr means all ones (the
// gather-sum that is permute's backward). pos outside [0, P) contributes nothing.
struct UnpermuteArgs {
  const void* y = nullptr;  // [P, D]
  DType dtype = DType::kFloat32;
  int64_t dim = 0;          // D
  int64_t n_rows = 0;       // P
  const int64_t* pos = nullptr;    // [T, K]
  const float* weights = nullptr;  // [T, K] or nullptr
  void* out = nullptr;      // [T, D]
  int64_t n_tokens = 0;
  int top_k = 0;
};

cudaError_t launch_moe_unpermute(const UnpermuteArgs& args, cudaStream_t stream);

// Backward of unpermute: grad_y[pos[t, k]] = w[t, k] * g[t] (rows no token reads get 0) and
// grad_w[t, k] = <g[t], y[pos[t, k]]> in fp32. Either output may be nullptr (not needed).
struct UnpermuteBackwardArgs {
  const void* grad_out = nullptr;  // [T, D]
  const void* y = nullptr;         // [P, D]
  DType dtype = DType::kFloat32;
  int64_t dim = 0;
  int64_t n_rows = 0;
  const int64_t* pos = nullptr;
  const float* weights = nullptr;  // [T, K]
  void* grad_y = nullptr;          // [P, D] or nullptr
  float* grad_w = nullptr;         // [T, K] or nullptr
  uint8_t* mark = nullptr;         // [P] scratch, required with grad_y
  int64_t n_tokens = 0;
  int top_k = 0;
};

cudaError_t launch_moe_unpermute_backward(const UnpermuteBackwardArgs& args, cudaStream_t stream);

// Zeroes the rows of out [P, row_bytes] whose mark is 0 (shared by permute and unpermute's backward).
cudaError_t launch_zero_unmarked_rows(void* out, int64_t row_bytes, const uint8_t* mark, int64_t n_rows,
                                      cudaStream_t stream);

}  // namespace r1core
