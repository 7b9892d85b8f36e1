// Fused Taylor partial sums on CUDA: w and g are read once, rows and columns reduced together.
//
// Deterministic two-pass scheme (no float atomics, so scores and the plans ranked from them
// are reproducible run to run):
//  1. taylor_tiles_kernel: a block owns a kTileR x kTileC tile (grid-stride over tiles).  Lane l
//     of a warp reads columns c0 + l + 32 * k (coalesced when the column stride is 1), so a warp
//     covers one row of the tile; row partials come from a warp shuffle reduction and go to
//     row_part[tile column], column partials are kept in registers over the warp's rows, summed
//     over the warps through shared memory in a fixed order and go to col_part[tile row].
//     Every partial slot is written exactly once, so the scratch needs no zeroing.
//  2. fold_kernel: one warp per accumulator entry sums its partials (over tiles and over the
//     row/column block) in a fixed order and adds the total into the caller's accumulator.
// Scratch: 12 * (R * ceil(C / kTileC) + C * ceil(R / kTileR)) bytes, under 10 % of the traffic
// of bf16 inputs.  A column-major input is handled by the caller as the transposed problem.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace fastprune::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kColsPerLane = 4;
constexpr int kTileC = 32 * kColsPerLane;
constexpr int kTileR = 128;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    taylor_tiles_kernel(const T* __restrict__ w, const T* __restrict__ g, int64_t R, int64_t C, int64_t swr,
                        int64_t swc, int64_t sgr, int64_t sgc, int64_t n_row_tiles, int64_t n_col_tiles,
                        float* __restrict__ row_part, float* __restrict__ col_part) {
  __shared__ float col_smem[3][kWarps][kTileC];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t tile = blockIdx.x; tile < n_row_tiles * n_col_tiles; tile += gridDim.x) {
    const int64_t rt = tile / n_col_tiles, ct = tile % n_col_tiles;
    const int64_t r0 = rt * kTileR, c0 = ct * kTileC;
    float ca[kColsPerLane] = {}, cs[kColsPerLane] = {}, cq[kColsPerLane] = {};
    for (int i = warp; i < kTileR && r0 + i < R; i += kWarps) {
      const int64_t r = r0 + i;
      float a = 0.f, s = 0.f, q = 0.f;
#pragma unroll
      for (int k = 0; k < kColsPerLane; ++k) {
        const int64_t c = c0 + lane + 32 * k;
        if (c < C) {
          const float p = to_float(w[r * swr + c * swc]) * to_float(g[r * sgr + c * sgc]);
          a += fabsf(p);
          s += p;
          q += p * p;
          ca[k] += fabsf(p);
          cs[k] += p;
          cq[k] += p * p;
        }
      }
      a = warp_sum(a);
      s = warp_sum(s);
      q = warp_sum(q);
      if (lane == 0) {
        float* out = row_part + ct * 3 * R + r;
        out[0] = a;
        out[R] = s;
        out[2 * R] = q;
      }
    }
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      col_smem[0][warp][lane + 32 * k] = ca[k];
      col_smem[1][warp][lane + 32 * k] = cs[k];
      col_smem[2][warp][lane + 32 * k] = cq[k];
    }
    __syncthreads();
    for (int j = threadIdx.x; j < 3 * kTileC; j += kThreads) {
      const int ch = j / kTileC, col = j % kTileC;
      const int64_t c = c0 + col;
      if (c < C) {
        float t = 0.f;
        for (int wi = 0; wi < kWarps; ++wi) t += col_smem[ch][wi][col];
        col_part[(rt * 3 + ch) * C + c] = t;
      }
    }
    __syncthreads();
  }
}

// acc[k * s0 + b * s1] += sum over tiles t and m < block of part[(t * 3 + k) * N + b * block + m].
__global__ void fold_kernel(const float* __restrict__ part, int64_t n_tiles, int64_t N, int64_t block,
                            float* __restrict__ acc, int64_t s0, int64_t s1) {
  const int lane = threadIdx.x & 31;
  const int64_t n_blocks = N / block, n_out = 3 * n_blocks;
  const int64_t warps_total = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; o < n_out;
       o += warps_total) {
    const int64_t k = o / n_blocks, b = o % n_blocks;
    float s = 0.f;
    for (int64_t j = lane; j < n_tiles * block; j += 32) {
      const int64_t t = j / block, m = j % block;
      s += part[(t * 3 + k) * N + b * block + m];
    }
    s = warp_sum(s);
    if (lane == 0) acc[k * s0 + b * s1] += s;
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
cudaError_t launch_typed(const TaylorArgs& a, float* row_part, float* col_part, cudaStream_t stream) {
  int device = 0, sms = 1;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t n_rt = cdiv(a.R, kTileR), n_ct = cdiv(a.C, kTileC);
  const int64_t grid = n_rt * n_ct < 8LL * sms ? n_rt * n_ct : 8LL * sms;
  taylor_tiles_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      static_cast<const T*>(a.weight), static_cast<const T*>(a.grad), a.R, a.C, a.weight_stride[0],
      a.weight_stride[1], a.grad_stride[0], a.grad_stride[1], n_rt, n_ct, row_part, col_part);
  const int64_t fold_warps = 3 * (a.R / a.row_block) + 3 * (a.C / a.col_block);
  const int64_t fold_grid = cdiv(fold_warps * 32, 256) < 32LL * sms ? cdiv(fold_warps * 32, 256) : 32LL * sms;
  fold_kernel<<<static_cast<unsigned>(fold_grid), 256, 0, stream>>>(row_part, n_ct, a.R, a.row_block, a.rows,
                                                                     a.rows_stride[0], a.rows_stride[1]);
  fold_kernel<<<static_cast<unsigned>(fold_grid), 256, 0, stream>>>(col_part, n_rt, a.C, a.col_block, a.cols,
                                                                     a.cols_stride[0], a.cols_stride[1]);
  return cudaGetLastError();
}

}  // namespace

size_t taylor_workspace_bytes(int64_t R, int64_t C) {
  return sizeof(float) * 3 * static_cast<size_t>(R * cdiv(C, kTileC) + C * cdiv(R, kTileR));
}

cudaError_t taylor_accumulate_launch(const TaylorArgs& args, void* workspace, cudaStream_t stream) {
  if (args.R == 0 || args.C == 0) return cudaSuccess;
  float* row_part = static_cast<float*>(workspace);
  float* col_part = row_part + 3 * args.R * cdiv(args.C, kTileC);
  switch (args.dtype) {
    case DType::kFloat32: return launch_typed<float>(args, row_part, col_part, stream);
    case DType::kFloat16: return launch_typed<__half>(args, row_part, col_part, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(args, row_part, col_part, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastprune::cuda
