#include "common/moe_common.h"

namespace r1core {

int current_sm_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {0};  // benign race: every writer stores the same value
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (dev < 0 || dev >= kMaxDevices) dev = 0;
  if (cached[dev] == 0) {
    int n = 0;
    cached[dev] = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && n > 0 ? n : 132;
  }
  return cached[dev];
}

}  // namespace r1core
