// Plain launch interface of the CUDA kernels: raw pointers, sizes and strides (in elements),
// no torch types, so the .cu files need CUDA headers only.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fastprune::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct TaylorArgs {
  const void* weight;
  const void* grad;
  DType dtype;
  int64_t R, C;
  int64_t weight_stride[2], grad_stride[2];
  float* rows;  // (3, R / row_block), strides rows_stride
  float* cols;  // (3, C / col_block), strides cols_stride
  int64_t rows_stride[2], cols_stride[2];
  int64_t row_block, col_block;
};

// Bytes of device scratch taylor_accumulate_launch needs for an (R, C) matrix.
size_t taylor_workspace_bytes(int64_t R, int64_t C);
cudaError_t taylor_accumulate_launch(const TaylorArgs& args, void* workspace, cudaStream_t stream);

constexpr int kMaxGatherDims = 8;

struct GatherArgs {
  const void* src;
  void* dst;              // contiguous, shape `sizes`
  const int64_t* index;   // index[k] should lie in [0, extent)
  int64_t extent;         // src's size along `dim`
  int* bad_index;         // device flag, set to 1 when an index is outside [0, extent) (that read is skipped)
  int ndim, dim;
  int64_t sizes[kMaxGatherDims];        // output sizes (sizes[dim] = number of indices)
  int64_t src_strides[kMaxGatherDims];  // in units
  int unit_bytes;                       // 1, 2, 4, 8 or 16: the size of one copied unit
};

cudaError_t gather_launch(const GatherArgs& args, cudaStream_t stream);

}  // namespace fastprune::cuda
