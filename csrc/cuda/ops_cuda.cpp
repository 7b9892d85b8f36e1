// Torch glue of the CUDA kernels: validates inputs, then calls the launchers with raw pointers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <string>

#include "checks.h"
#include "cuda/launchers.h"
#include "ops.h"

namespace fastprune {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    default: return cuda::DType::kBFloat16;  // check_taylor_args allows nothing else
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void taylor_launch(const at::Tensor& w, const at::Tensor& g, const at::Tensor& rows, const at::Tensor& cols,
                   int64_t row_block, int64_t col_block) {
  const int64_t R = w.size(0), C = w.size(1);
  at::Tensor scratch = at::empty({static_cast<int64_t>(cuda::taylor_workspace_bytes(R, C))},
                                 w.options().dtype(at::kByte));
  cuda::TaylorArgs a{};
  a.weight = w.const_data_ptr();
  a.grad = g.const_data_ptr();
  a.dtype = to_dtype(w.scalar_type());
  a.R = R;
  a.C = C;
  a.weight_stride[0] = w.stride(0);
  a.weight_stride[1] = w.stride(1);
  a.grad_stride[0] = g.stride(0);
  a.grad_stride[1] = g.stride(1);
  a.rows = rows.data_ptr<float>();
  a.cols = cols.data_ptr<float>();
  a.rows_stride[0] = rows.stride(0);
  a.rows_stride[1] = rows.stride(1);
  a.cols_stride[0] = cols.stride(0);
  a.cols_stride[1] = cols.stride(1);
  a.row_block = row_block;
  a.col_block = col_block;
  check_launch(cuda::taylor_accumulate_launch(a, scratch.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "taylor_accumulate_");
}

// The widest unit in bytes that divides `bytes` and both addresses.
int unit_for(int64_t bytes, const void* p, const void* q) {
  const auto bits = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(q);
  for (int unit : {16, 8, 4, 2}) {
    if (bytes % unit == 0 && bits % unit == 0) return unit;
  }
  return 1;
}

}  // namespace

void taylor_accumulate_cuda(const at::Tensor& weight, const at::Tensor& grad, const at::Tensor& rows,
                            const at::Tensor& cols, int64_t row_block, int64_t col_block) {
  check_taylor_args(weight, grad, rows, cols, row_block, col_block, at::kCUDA);
  const c10::cuda::CUDAGuard guard(weight.device());
  if (is_column_major_pair(weight, grad)) {
    taylor_launch(weight.t(), grad.t(), cols, rows, col_block, row_block);
  } else {
    taylor_launch(weight, grad, rows, cols, row_block, col_block);
  }
}

at::Tensor gather_cuda(const at::Tensor& src, int64_t dim, const at::Tensor& index) {
  dim = check_gather_args(src, dim, index, at::kCUDA);
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t extent = src.size(dim);
  const at::Tensor idx = index.contiguous();
  auto sizes = src.sizes().vec();
  sizes[dim] = idx.numel();
  at::Tensor out = at::empty(sizes, src.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  // Bounds are checked by the kernel as it reads each index; the flag becomes an error on the
  // device (no host synchronisation: compaction calls this once per matrix).
  at::Tensor bad_index = at::zeros({1}, src.options().dtype(at::kInt));

  cuda::GatherArgs a{};
  a.src = src.const_data_ptr();
  a.dst = out.data_ptr();
  a.index = idx.const_data_ptr<int64_t>();
  a.extent = extent;
  a.bad_index = bad_index.data_ptr<int>();
  const int64_t es = src.element_size();
  if (src.is_contiguous()) {
    // (outer, extent, inner) viewed in the widest unit the inner row allows.
    int64_t outer = 1, inner = 1;
    for (int64_t d = 0; d < dim; ++d) outer *= src.size(d);
    for (int64_t d = dim + 1; d < src.dim(); ++d) inner *= src.size(d);
    const int unit = unit_for(inner * es, a.src, a.dst);
    const int64_t inner_units = inner * es / unit;
    a.ndim = 3;
    a.dim = 1;
    a.sizes[0] = outer;
    a.sizes[1] = idx.numel();
    a.sizes[2] = inner_units;
    a.src_strides[0] = extent * inner_units;
    a.src_strides[1] = inner_units;
    a.src_strides[2] = 1;
    a.unit_bytes = unit;
  } else {
    TORCH_CHECK(src.dim() <= cuda::kMaxGatherDims, "gather: a non-contiguous src may have at most ",
                cuda::kMaxGatherDims, " dimensions on CUDA, got ", src.dim());
    TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8 || es == 16, "gather: unsupported element size ", es);
    a.ndim = static_cast<int>(src.dim());
    a.dim = static_cast<int>(dim);
    for (int64_t d = 0; d < src.dim(); ++d) {
      a.sizes[d] = sizes[d];
      a.src_strides[d] = src.stride(d);
    }
    a.unit_bytes = static_cast<int>(es);
  }
  check_launch(cuda::gather_launch(a, c10::cuda::getCurrentCUDAStream()), "gather");
  const std::string message = c10::str("gather: index has values out of range [0, ", extent, ") for dim ", dim,
                                       " of src with shape ", src.sizes());
  at::_assert_async(bad_index.eq(0), message);
  return out;
}

}  // namespace fastprune
