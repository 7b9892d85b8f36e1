// Host-side input validation shared by the CPU kernels and the CUDA glue.
#pragma once

#include <ATen/ATen.h>

namespace fastprune {

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "taylor_accumulate_: ", name, " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_accumulator(const at::Tensor& acc, const char* name, int64_t n, at::Device device) {
  TORCH_CHECK(acc.layout() == at::kStrided, "taylor_accumulate_: ", name, " must be a dense tensor");
  TORCH_CHECK(acc.device() == device, "taylor_accumulate_: ", name, " must be on ", device, " like weight, got ",
              acc.device());
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "taylor_accumulate_: ", name, " must be float32, got ",
              acc.scalar_type());
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == 3 && acc.size(1) == n, "taylor_accumulate_: ", name,
              " must have shape (3, ", n, "), got ", acc.sizes());
}

// weight, grad: (R, C) on `device`; rows: (3, R / row_block) and cols: (3, C / col_block) float32.
inline void check_taylor_args(const at::Tensor& weight, const at::Tensor& grad, const at::Tensor& rows,
                              const at::Tensor& cols, int64_t row_block, int64_t col_block,
                              at::DeviceType device) {
  TORCH_CHECK(weight.layout() == at::kStrided && grad.layout() == at::kStrided,
              "taylor_accumulate_: weight and grad must be dense tensors");
  TORCH_CHECK(weight.device().type() == device, "taylor_accumulate_: weight must be a ", device,
              " tensor, got ", weight.device());
  TORCH_CHECK(grad.device() == weight.device(), "taylor_accumulate_: grad must be on ", weight.device(),
              " like weight, got ", grad.device());
  TORCH_CHECK(weight.dim() == 2, "taylor_accumulate_: weight must be 2-D (R, C), got shape ", weight.sizes());
  TORCH_CHECK(grad.sizes() == weight.sizes(), "taylor_accumulate_: grad must have weight's shape ",
              weight.sizes(), ", got ", grad.sizes());
  check_float_dtype(weight, "weight");
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "taylor_accumulate_: grad must have weight's dtype ",
              weight.scalar_type(), ", got ", grad.scalar_type());
  const int64_t r = weight.size(0), c = weight.size(1);
  TORCH_CHECK(row_block >= 1 && r % row_block == 0, "taylor_accumulate_: row_block ", row_block,
              " must be >= 1 and divide weight's ", r, " rows");
  TORCH_CHECK(col_block >= 1 && c % col_block == 0, "taylor_accumulate_: col_block ", col_block,
              " must be >= 1 and divide weight's ", c, " columns");
  check_accumulator(rows, "rows", r / row_block, weight.device());
  check_accumulator(cols, "cols", c / col_block, weight.device());
}

// Returns dim wrapped into [0, src.dim()).
// A column-major pair (e.g. a transposed view) is the row-major Taylor problem with rows and
// columns swapped: both backends then read along the unit-stride dimension.
inline bool is_column_major_pair(const at::Tensor& weight, const at::Tensor& grad) {
  return weight.stride(0) == 1 && grad.stride(0) == 1 && weight.size(0) > 1 &&
         (weight.stride(1) != 1 || grad.stride(1) != 1);
}

inline int64_t check_gather_args(const at::Tensor& src, int64_t dim, const at::Tensor& index,
                                 at::DeviceType device) {
  TORCH_CHECK(src.layout() == at::kStrided, "gather: src must be a dense tensor");
  TORCH_CHECK(src.device().type() == device, "gather: src must be a ", device, " tensor, got ", src.device());
  TORCH_CHECK(src.dim() >= 1, "gather: src must have at least one dimension, got a 0-D tensor");
  TORCH_CHECK(dim >= -src.dim() && dim < src.dim(), "gather: dim ", dim, " is out of range for src of shape ",
              src.sizes());
  TORCH_CHECK(index.device() == src.device(), "gather: index must be on ", src.device(), " like src, got ",
              index.device());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "gather: index must be a 1-D int64 tensor, got ", index.dim(), "-D ", index.scalar_type());
  return dim < 0 ? dim + src.dim() : dim;
}

}  // namespace fastprune
