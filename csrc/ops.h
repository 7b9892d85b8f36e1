// The native entry points bound in bindings.cpp (ATen types; kernels live in cpu/ and cuda/).
#pragma once

#include <ATen/ATen.h>

namespace fastprune {

// rows[k, i] += sum over rows of block i, cols[k, j] += sum over columns of block j, of
// k = 0: |w*g|, 1: w*g, 2: (w*g)^2, accumulated in float32.
void taylor_accumulate_cpu(const at::Tensor& weight, const at::Tensor& grad, const at::Tensor& rows,
                           const at::Tensor& cols, int64_t row_block, int64_t col_block);
// src.index_select(dim, index) into a new contiguous tensor.
at::Tensor gather_cpu(const at::Tensor& src, int64_t dim, const at::Tensor& index);

#ifdef FASTPRUNE_WITH_CUDA
void taylor_accumulate_cuda(const at::Tensor& weight, const at::Tensor& grad, const at::Tensor& rows,
                            const at::Tensor& cols, int64_t row_block, int64_t col_block);
at::Tensor gather_cuda(const at::Tensor& src, int64_t dim, const at::Tensor& index);
#endif

}  // namespace fastprune
