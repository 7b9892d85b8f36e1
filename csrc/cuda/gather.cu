// Compaction copy on CUDA: dst = src.index_select(dim, index), dst contiguous, one pass.
//
// One thread per output unit, grid-stride; consecutive threads write consecutive units
// (coalesced) and read consecutive units whenever src's last dimension is contiguous and not
// the gathered one.  The caller picks the unit: for a contiguous src it views the problem as
// (outer, index, inner bytes) and copies 16-, 8-, 4-, 2- or 1-byte units, the widest that the
// row length and pointer alignment allow; otherwise a unit is one element.  An index outside
// [0, extent) is never read through: its units are written as zeros and a device flag is raised,
// which the caller turns into an error without synchronising.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace fastprune::cuda {
namespace {

struct Dims {
  int ndim, dim;
  int64_t extent;
  int64_t sizes[kMaxGatherDims];
  int64_t strides[kMaxGatherDims];
};

template <typename U>
__global__ void gather_kernel(const U* __restrict__ src, U* __restrict__ dst, const int64_t* __restrict__ index,
                              Dims d, int64_t n, int* __restrict__ bad_index) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t rem = i, offset = 0;
    bool in_range = true;
    for (int k = d.ndim - 1; k >= 0; --k) {
      int64_t j = rem % d.sizes[k];
      rem /= d.sizes[k];
      if (k == d.dim) {
        j = index[j];
        in_range = j >= 0 && j < d.extent;
      }
      offset += j * d.strides[k];
    }
    if (in_range) {
      dst[i] = src[offset];
    } else {
      dst[i] = U{};
      *bad_index = 1;
    }
  }
}

template <typename U>
cudaError_t launch_typed(const GatherArgs& a, cudaStream_t stream) {
  Dims d{a.ndim, a.dim, a.extent, {}, {}};
  int64_t n = 1;
  for (int k = 0; k < a.ndim; ++k) {
    d.sizes[k] = a.sizes[k];
    d.strides[k] = a.src_strides[k];
    n *= a.sizes[k];
  }
  if (n == 0) return cudaSuccess;
  int device = 0, sms = 1;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t grid = blocks < 16LL * sms ? blocks : 16LL * sms;
  gather_kernel<U><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      static_cast<const U*>(a.src), static_cast<U*>(a.dst), a.index, d, n, a.bad_index);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_launch(const GatherArgs& args, cudaStream_t stream) {
  if (args.ndim < 1 || args.ndim > kMaxGatherDims || args.dim < 0 || args.dim >= args.ndim) {
    return cudaErrorInvalidValue;
  }
  switch (args.unit_bytes) {
    case 1: return launch_typed<uint8_t>(args, stream);
    case 2: return launch_typed<uint16_t>(args, stream);
    case 4: return launch_typed<uint32_t>(args, stream);
    case 8: return launch_typed<uint2>(args, stream);
    case 16: return launch_typed<uint4>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastprune::cuda
