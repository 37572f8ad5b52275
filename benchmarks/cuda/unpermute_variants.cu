// Standalone experiment behind csrc/moe_permute/moe_unpermute.cu's forward kernel: variants of the weighted
// gather-sum (unpermute + combine) at DeepSeek-V3 shapes (T 16384, K 8, D 7168 bf16, random positions),
// timed against a plain copy kernel and cudaMemcpy of 2 GiB. Results: benchmarks/RESULTS.md section 2.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -o /tmp/unp benchmarks/cuda/unpermute_variants.cu && /tmp/unp
//
// LANE_VECS: 16-byte vectors per lane per row; TPW: tokens per warp (next token's positions prefetched);
// MINB: __launch_bounds__ min blocks per SM; BATCH: rows loaded before any is consumed.
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <random>
#include <algorithm>

constexpr unsigned kFull = 0xffffffffu;
struct alignas(16) V8 { __nv_bfloat16 v[8]; };

template <int LANE_VECS, int TPW, int MINB, int BATCH = 8>
__global__ void __launch_bounds__(256, MINB)
unp(const V8* __restrict__ y, const int64_t* __restrict__ pos, const float* __restrict__ w, V8* __restrict__ out,
    int64_t T, int K, int64_t n_vec, int64_t P) {
  const int lane = threadIdx.x % 32;
  const int64_t t0 = (int64_t(blockIdx.x) * 8 + threadIdx.x / 32) * TPW;
  const int64_t v0 = int64_t(blockIdx.y) * 32 * LANE_VECS + lane;
  auto load_pw = [&](int64_t t, int64_t& p, float& wk) {
    p = -1; wk = 0.f;
    if (t < T && lane < K) { int64_t q = pos[t * K + lane]; p = q >= 0 && q < P ? q : -1; wk = w[t * K + lane]; }
  };
  int64_t cp; float cw;
  load_pw(t0, cp, cw);
  for (int i = 0; i < TPW; ++i) {
    const int64_t t = t0 + i;
    if (t >= T) return;
    int64_t np; float nw;
    if (i + 1 < TPW) load_pw(t + 1, np, nw);
    float acc[LANE_VECS][8];
#pragma unroll
    for (int u = 0; u < LANE_VECS; ++u)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
    for (int k0 = 0; k0 < K; k0 += BATCH) {
      V8 buf[BATCH][LANE_VECS];
      int64_t p[BATCH]; float wk[BATCH];
#pragma unroll
      for (int j = 0; j < BATCH; ++j) {
        p[j] = __shfl_sync(kFull, cp, (k0 + j) & 31);
        wk[j] = __shfl_sync(kFull, cw, (k0 + j) & 31);
        if (k0 + j >= K) p[j] = -1;
      }
#pragma unroll
      for (int j = 0; j < BATCH; ++j)
#pragma unroll
        for (int u = 0; u < LANE_VECS; ++u) {
          const int64_t v = v0 + u * 32;
          if (p[j] >= 0 && v < n_vec) buf[j][u] = y[p[j] * n_vec + v];
        }
#pragma unroll
      for (int j = 0; j < BATCH; ++j) {
        if (p[j] < 0) continue;
#pragma unroll
        for (int u = 0; u < LANE_VECS; ++u)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[u][e] = __fadd_rn(acc[u][e], __fmul_rn(__bfloat162float(buf[j][u].v[e]), wk[j]));
      }
    }
#pragma unroll
    for (int u = 0; u < LANE_VECS; ++u) {
      const int64_t v = v0 + u * 32;
      if (v >= n_vec) continue;
      V8 o;
#pragma unroll
      for (int e = 0; e < 8; ++e) o.v[e] = __float2bfloat16_rn(acc[u][e]);
      out[t * n_vec + v] = o;
    }
    if (i + 1 < TPW) { cp = np; cw = nw; }
  }
}

// Copy of the same bytes for reference: read P rows, write T rows (a plain gather of row 0 of each group).
__global__ void copy_k(const uint4* __restrict__ a, uint4* __restrict__ b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) b[i] = a[i];
}

template <int LV, int TPW, int MINB, int BATCH = 8>
float run(const V8* y, const int64_t* pos, const float* w, V8* out, int64_t T, int K, int64_t nv, int64_t P, const char* name, V8* ref, bool check) {
  dim3 grid((T + 8 * TPW - 1) / (8 * TPW), (nv + 32 * LV - 1) / (32 * LV));
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) unp<LV, TPW, MINB, BATCH><<<grid, 256>>>(y, pos, w, out, T, K, nv, P);
  cudaEventRecord(a);
  for (int i = 0; i < 20; ++i) unp<LV, TPW, MINB, BATCH><<<grid, 256>>>(y, pos, w, out, T, K, nv, P);
  cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b); ms /= 20;
  cudaFuncAttributes attr; cudaFuncGetAttributes(&attr, unp<LV, TPW, MINB, BATCH>);
  int nb = 0; cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, unp<LV, TPW, MINB, BATCH>, 256, 0);
  bool same = true;
  if (check) {
    std::vector<uint16_t> h1(T * nv * 8), h2(T * nv * 8);
    cudaMemcpy(h1.data(), out, h1.size() * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(h2.data(), ref, h2.size() * 2, cudaMemcpyDeviceToHost);
    same = h1 == h2;
  }
  double gb = double(T * K + T) * nv * 16 / 1e9;
  printf("%-28s %.3f ms  %.0f GB/s  regs %d  blocks/SM %d  %s\n", name, ms, gb / ms * 1e3, attr.numRegs, nb, check ? (same ? "bitwise = A" : "DIFFERS") : "");
  return ms;
}

int main() {
  const int64_t T = 16384, K = 8, D = 7168, nv = D / 8, P = T * K;
  V8 *y, *out, *ref; int64_t* pos; float* w;
  cudaMalloc(&y, P * nv * 16); cudaMalloc(&out, T * nv * 16); cudaMalloc(&ref, T * nv * 16);
  cudaMalloc(&pos, T * K * 8); cudaMalloc(&w, T * K * 4);
  std::vector<uint16_t> hy(P * nv * 8);
  std::mt19937 rng(0);
  for (auto& v : hy) v = 0x3f80 + (rng() % 128) - 64;
  cudaMemcpy(y, hy.data(), hy.size() * 2, cudaMemcpyHostToDevice);
  std::vector<int64_t> perm(P); for (int64_t i = 0; i < P; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<float> hw(T * K); for (auto& v : hw) v = (rng() % 1000) / 1000.f;
  cudaMemcpy(pos, perm.data(), P * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(w, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice);
  {
    uint4 *a, *b; int64_t n = (2LL << 30) / 16; cudaMalloc(&a, n * 16); cudaMalloc(&b, n * 16);
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    copy_k<<<132 * 16, 256>>>(a, b, n); cudaEventRecord(e0);
    for (int i = 0; i < 10; ++i) copy_k<<<132 * 16, 256>>>(a, b, n);
    cudaEventRecord(e1); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1); ms /= 10;
    printf("copy 2 GiB: %.3f ms  %.0f GB/s (read+write)\n", ms, 2.0 * n * 16 / 1e9 / ms * 1e3);
    cudaMemcpy(b, a, n * 16, cudaMemcpyDeviceToDevice); cudaEventRecord(e0);
    for (int i = 0; i < 10; ++i) cudaMemcpyAsync(b, a, n * 16, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1); cudaEventSynchronize(e1); cudaEventElapsedTime(&ms, e0, e1); ms /= 10;
    printf("cudaMemcpy 2 GiB: %.3f ms  %.0f GB/s (read+write)\n", ms, 2.0 * n * 16 / 1e9 / ms * 1e3);
    cudaFree(a); cudaFree(b);
  }
  run<2, 1, 1>(y, pos, w, ref, T, K, nv, P, "A lv2 tpw1 (repo)", ref, false);
  run<2, 1, 2>(y, pos, w, out, T, K, nv, P, "B lv2 tpw1 minb2", ref, true);
  run<2, 4, 2>(y, pos, w, out, T, K, nv, P, "C lv2 tpw4 minb2", ref, true);
  run<1, 4, 3>(y, pos, w, out, T, K, nv, P, "D lv1 tpw4 minb3", ref, true);
  run<1, 8, 4>(y, pos, w, out, T, K, nv, P, "E lv1 tpw8 minb4", ref, true);
  run<2, 8, 2>(y, pos, w, out, T, K, nv, P, "F lv2 tpw8 minb2", ref, true);
  run<4, 4, 1>(y, pos, w, out, T, K, nv, P, "G lv4 tpw4 minb1", ref, true);
  run<1, 1, 4>(y, pos, w, out, T, K, nv, P, "H lv1 tpw1 minb4", ref, true);
  run<2, 2, 2>(y, pos, w, out, T, K, nv, P, "I lv2 tpw2 minb2", ref, true);
  run<1, 1, 1>(y, pos, w, out, T, K, nv, P, "J lv1 tpw1", ref, true);
  run<1, 2, 1>(y, pos, w, out, T, K, nv, P, "K lv1 tpw2", ref, true);
  run<2, 1, 1, 4>(y, pos, w, out, T, K, nv, P, "L lv2 tpw1 batch4", ref, true);
  run<1, 1, 1, 4>(y, pos, w, out, T, K, nv, P, "M lv1 tpw1 batch4", ref, true);
  run<1, 4, 1, 4>(y, pos, w, out, T, K, nv, P, "N lv1 tpw4 batch4", ref, true);
  run<4, 1, 1, 2>(y, pos, w, out, T, K, nv, P, "O lv4 tpw1 batch2", ref, true);
  // Same kernel, pos sorted (rows read in order): is the random row order the cost?
  std::sort(perm.begin(), perm.end());
  cudaMemcpy(pos, perm.data(), P * 8, cudaMemcpyHostToDevice);
  run<2, 1, 1>(y, pos, w, out, T, K, nv, P, "A sorted pos", ref, false);
  run<2, 4, 2>(y, pos, w, out, T, K, nv, P, "C sorted pos", ref, false);
  printf("err %s\n", cudaGetErrorString(cudaGetLastError()));
}
