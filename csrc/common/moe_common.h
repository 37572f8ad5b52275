// Shared by the CUDA kernels (csrc/moe_*/*.cu) and the torch binding (csrc/r1core_ext.cpp).
// Plain C++ over the CUDA runtime: the .cu files never include torch headers, so they compile
// fast and can be checked with nvcc alone; all tensor checks live in the binding.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace r1core {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Streaming multiprocessors of the current device, cached per device (sizes persistent grids).
int current_sm_count();

}  // namespace r1core
