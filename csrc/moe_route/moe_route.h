// Group-limited top-k MoE routing (DeepSeek-V3 §2.1.2), the contract of r1core.model.moe.route_ref.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/moe_common.h"

namespace r1core {

enum class ScoreMode : int {
  kSigmoid = 0,      // scores = sigmoid(logits), computed in the kernel
  kPrecomputed = 1,  // `logits` already hold the fp32 scores (softmax routing: computed by torch, see moe_cuda.py)
};

enum class GroupScore : int {
  kTop2Sum = 0,  // V3 (sigmoid): a group scores by the sum of its two best biased scores
  kMax = 1,      // V2 (softmax): by its best score
};

struct RouteArgs {
  const void* logits = nullptr;  // [T, E] row-major
  DType logits_dtype = DType::kFloat32;
  const float* bias = nullptr;   // [E] selection bias, or nullptr
  float* weights = nullptr;      // [T, K] out
  int64_t* idx = nullptr;        // [T, K] out
  int64_t* counts = nullptr;     // [E] out, zeroed by the caller
  int64_t n_tokens = 0;
  int n_experts = 0;
  int top_k = 0;
  int n_groups = 1;              // <= 1: no group limit
  int topk_groups = 1;
  ScoreMode score_mode = ScoreMode::kSigmoid;
  GroupScore group_score = GroupScore::kTop2Sum;
  bool norm_topk_prob = true;
  float route_scale = 1.0f;
};

// Largest expert count the router kernel holds in registers (16 values per lane).
constexpr int kRouteMaxExperts = 512;
constexpr int kRouteMaxTopK = 32;

cudaError_t launch_moe_route(const RouteArgs& args, cudaStream_t stream);

}  // namespace r1core
