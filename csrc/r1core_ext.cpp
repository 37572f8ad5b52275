// r1core._C: torch binding for the CUDA kernels in csrc/moe_route and csrc/moe_permute.
//
// Every tensor contract is checked here, with messages that name the argument; the kernels behind
// the launch_* functions take raw pointers and trust these checks. Python wrappers with autograd:
// r1core/kernels/moe_cuda.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "moe_permute/moe_permute.h"
#include "moe_route/moe_route.h"

namespace {

using r1core::DType;

void check_cuda_contiguous(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (shape ", t.sizes(), ", strides ", t.strides(), ")");
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " is on ", a.device(), " but ", bn, " is on ", b.device());
}

DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// score_mode: 0 = sigmoid of `logits` in the kernel, 1 = `logits` are precomputed fp32 scores.
// group_score: 0 = top-2 sum, 1 = max.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                         int64_t top_k, int64_t n_groups, int64_t topk_groups,
                                                         int64_t score_mode, int64_t group_score, bool norm_topk_prob,
                                                         double route_scale) {
  check_cuda_contiguous(logits, "logits_TE", 2);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(score_mode == 0 || score_mode == 1, "score_mode must be 0 (sigmoid) or 1 (precomputed), got ", score_mode);
  TORCH_CHECK(group_score == 0 || group_score == 1, "group_score must be 0 (top-2 sum) or 1 (max), got ", group_score);
  const DType dtype = float_dtype(logits, "logits_TE");
  if (score_mode == 1) check_dtype(logits, "precomputed scores_TE", at::kFloat);
  TORCH_CHECK(E >= 1 && E <= r1core::kRouteMaxExperts, "n_experts (logits_TE.shape[1]) must be in [1, ",
              r1core::kRouteMaxExperts, "], got ", E);
  TORCH_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(E, r1core::kRouteMaxTopK), "top_k must be in [1, min(n_experts, ",
              r1core::kRouteMaxTopK, ")], got ", top_k, " with n_experts=", E);
  if (n_groups > 1) {
    TORCH_CHECK(E % n_groups == 0, "n_experts=", E, " is not divisible by n_groups=", n_groups);
    TORCH_CHECK(topk_groups >= 1 && topk_groups <= n_groups, "topk_groups must be in [1, n_groups=", n_groups,
                "], got ", topk_groups);
    TORCH_CHECK(group_score != 0 || E / n_groups >= 2,
                "top-2-sum group scores need >= 2 experts per group, got ", E / n_groups);
  }
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_cuda_contiguous(*bias, "bias_E", 1);
    check_dtype(*bias, "bias_E", at::kFloat);
    check_same_device(*bias, "bias_E", logits, "logits_TE");
    TORCH_CHECK(bias->size(0) == E, "bias_E has ", bias->size(0), " entries for ", E, " experts");
    bias_ptr = bias->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  auto idx = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  auto counts = at::zeros({E}, logits.options().dtype(at::kLong));
  r1core::RouteArgs a;
  a.logits = logits.data_ptr();
  a.logits_dtype = dtype;
  a.bias = bias_ptr;
  a.weights = weights.data_ptr<float>();
  a.idx = idx.data_ptr<int64_t>();
  a.counts = counts.data_ptr<int64_t>();
  a.n_tokens = T;
  a.n_experts = int(E);
  a.top_k = int(top_k);
  a.n_groups = int(std::max<int64_t>(n_groups, 1));
  a.topk_groups = int(topk_groups);
  a.score_mode = static_cast<r1core::ScoreMode>(score_mode);
  a.group_score = static_cast<r1core::GroupScore>(group_score);
  a.norm_topk_prob = norm_topk_prob;
  a.route_scale = float(route_scale);
  check_launch(r1core::launch_moe_route(a, c10::cuda::getCurrentCUDAStream().stream()), "moe_route kernel");
  return {weights, idx, counts};
}

void check_idx(const at::Tensor& idx, const char* name, const at::Tensor& like, const char* like_name) {
  check_cuda_contiguous(idx, name, 2);
  check_dtype(idx, name, at::kLong);
  check_same_device(idx, name, like, like_name);
  TORCH_CHECK(idx.size(1) >= 1 && idx.size(1) <= 256, name, " must have 1..256 columns (top_k), got ", idx.size(1));
}

std::tuple<at::Tensor, at::Tensor> moe_permute(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& counts,
                                               int64_t pad_multiple) {
  check_cuda_contiguous(x, "x_TD", 2);
  float_dtype(x, "x_TD");
  check_idx(idx, "idx_TK", x, "x_TD");
  TORCH_CHECK(idx.size(0) == x.size(0), "idx_TK has ", idx.size(0), " rows for ", x.size(0), " tokens in x_TD");
  TORCH_CHECK(counts.dim() == 1, "counts_E must be 1-D, got shape ", counts.sizes());
  check_dtype(counts, "counts_E", at::kLong);
  check_same_device(counts, "counts_E", x, "x_TD");
  TORCH_CHECK(pad_multiple >= 1, "pad_multiple must be >= 1, got ", pad_multiple);
  const int64_t T = x.size(0), D = x.size(1), K = idx.size(1), E = counts.size(0);
  TORCH_CHECK(D >= 1, "x_TD must have at least one column, got shape ", x.sizes());
  TORCH_CHECK(E >= 1 && E <= r1core::kPermuteMaxExperts, "n_experts (counts_E.numel()) must be in [1, ",
              r1core::kPermuteMaxExperts, "], got ", E);
  const int64_t P = T * K + (pad_multiple > 1 ? E * (pad_multiple - 1) : 0);
  TORCH_CHECK(P < (int64_t(1) << 31), "permuted rows P=", P, " must be < 2^31");
  const c10::cuda::CUDAGuard guard(x.device());
  auto x_out = at::empty({P, D}, x.options());
  auto pos = at::empty({T, K}, idx.options());
  if (P == 0) return {x_out, pos};  // no tokens and no padding
  const r1core::PermutePlan plan = r1core::plan_permute(T * K, int(E), P);
  auto workspace = at::empty({int64_t(plan.bytes)}, x.options().dtype(at::kByte));
  r1core::PermuteArgs a;
  a.x = x.data_ptr();
  a.x_out = x_out.data_ptr();
  a.row_bytes = D * x.element_size();
  a.idx = idx.data_ptr<int64_t>();
  a.pos = pos.data_ptr<int64_t>();
  a.n_tokens = T;
  a.top_k = int(K);
  a.n_experts = int(E);
  a.pad_multiple = int(pad_multiple);
  a.n_rows = P;
  a.workspace = workspace.data_ptr();
  a.plan = plan;
  check_launch(r1core::launch_moe_permute(a, c10::cuda::getCurrentCUDAStream().stream()), "moe_permute kernels");
  return {x_out, pos};
}

void check_weights(const at::Tensor& w, const at::Tensor& pos) {
  check_cuda_contiguous(w, "weights_TK", 2);
  check_dtype(w, "weights_TK", at::kFloat);
  check_same_device(w, "weights_TK", pos, "pos_TK");
  TORCH_CHECK(w.sizes() == pos.sizes(), "weights_TK shape ", w.sizes(), " != pos_TK shape ", pos.sizes());
}

// weights == None: unit weights (the gather-sum that is permute's backward).
at::Tensor moe_unpermute(const at::Tensor& y, const at::Tensor& pos, const std::optional<at::Tensor>& weights) {
  check_cuda_contiguous(y, "y_PD", 2);
  const DType dtype = float_dtype(y, "y_PD");
  check_idx(pos, "pos_TK", y, "y_PD");
  if (weights.has_value()) check_weights(*weights, pos);
  const int64_t T = pos.size(0), D = y.size(1);
  const c10::cuda::CUDAGuard guard(y.device());
  auto out = at::empty({T, D}, y.options());
  r1core::UnpermuteArgs a;
  a.y = y.data_ptr();
  a.dtype = dtype;
  a.dim = D;
  a.n_rows = y.size(0);
  a.pos = pos.data_ptr<int64_t>();
  a.weights = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  a.n_tokens = T;
  a.top_k = int(pos.size(1));
  check_launch(r1core::launch_moe_unpermute(a, c10::cuda::getCurrentCUDAStream().stream()), "moe_unpermute kernel");
  return out;
}

// Returns (grad_y_PD or None, grad_weights_TK or None).
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> moe_unpermute_backward(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& pos, const at::Tensor& weights,
    bool need_grad_y, bool need_grad_weights) {
  check_cuda_contiguous(y, "y_PD", 2);
  const DType dtype = float_dtype(y, "y_PD");
  check_cuda_contiguous(grad_out, "grad_y_TD", 2);
  check_dtype(grad_out, "grad_y_TD", y.scalar_type());
  check_idx(pos, "pos_TK", y, "y_PD");
  check_weights(weights, pos);
  check_same_device(grad_out, "grad_y_TD", y, "y_PD");
  TORCH_CHECK(grad_out.size(0) == pos.size(0) && grad_out.size(1) == y.size(1), "grad_y_TD shape ", grad_out.sizes(),
              " != [", pos.size(0), ", ", y.size(1), "]");
  const int64_t P = y.size(0), D = y.size(1), T = pos.size(0);
  const c10::cuda::CUDAGuard guard(y.device());
  std::optional<at::Tensor> grad_y, grad_w;
  at::Tensor mark;
  if (need_grad_y) {
    grad_y = at::empty({P, D}, y.options());
    mark = at::empty({P}, y.options().dtype(at::kByte));
  }
  if (need_grad_weights) grad_w = at::empty({T, pos.size(1)}, y.options().dtype(at::kFloat));
  r1core::UnpermuteBackwardArgs a;
  a.grad_out = grad_out.data_ptr();
  a.y = y.data_ptr();
  a.dtype = dtype;
  a.dim = D;
  a.n_rows = P;
  a.pos = pos.data_ptr<int64_t>();
  a.weights = weights.data_ptr<float>();
  a.grad_y = need_grad_y ? grad_y->data_ptr() : nullptr;
  a.grad_w = need_grad_weights ? grad_w->data_ptr<float>() : nullptr;
  a.mark = need_grad_y ? mark.data_ptr<uint8_t>() : nullptr;
  a.n_tokens = T;
  a.top_k = int(pos.size(1));
  if (need_grad_weights && (T == 0 || D == 0)) grad_w->zero_();
  check_launch(r1core::launch_moe_unpermute_backward(a, c10::cuda::getCurrentCUDAStream().stream()),
               "moe_unpermute backward kernel");
  return {grad_y, grad_w};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r1core CUDA kernels: MoE routing and token permutation (csrc/moe_route, csrc/moe_permute)";
  m.def("moe_route", &moe_route, "group-limited top-k routing -> (weights_TK fp32, idx_TK int64, counts_E int64)",
        py::arg("logits"), py::arg("bias"), py::arg("top_k"), py::arg("n_groups"), py::arg("topk_groups"),
        py::arg("score_mode"), py::arg("group_score"), py::arg("norm_topk_prob"), py::arg("route_scale"));
  m.def("moe_permute", &moe_permute, "x_TD, idx_TK, counts_E, pad_multiple -> (x_PD, pos_TK)", py::arg("x"),
        py::arg("idx"), py::arg("counts"), py::arg("pad_multiple"));
  m.def("moe_unpermute", &moe_unpermute, "y_PD, pos_TK, weights_TK | None -> y_TD", py::arg("y"), py::arg("pos"),
        py::arg("weights"));
  m.def("moe_unpermute_backward", &moe_unpermute_backward,
        "grad_y_TD, y_PD, pos_TK, weights_TK, need_grad_y, need_grad_weights -> (grad_y_PD | None, grad_weights_TK | None)",
        py::arg("grad_out"), py::arg("y"), py::arg("pos"), py::arg("weights"), py::arg("need_grad_y"),
        py::arg("need_grad_weights"));
}
