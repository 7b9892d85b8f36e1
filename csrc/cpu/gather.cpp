// Compaction copy on the CPU: out = src.index_select(dim, index), contiguous, in one pass.
//
// The output is walked row by row (a row is its last dimension); each row's source address
// comes from unravelling the row number over src's strides, with `index` applied on `dim`.
#include <ATen/Parallel.h>

#include <cstring>

#include "checks.h"
#include "ops.h"

namespace fastprune {
namespace {

// dst[j] = src[j * stride] (or src[index[j] * stride] when index is given), stride in bytes.
template <typename U>
void copy_row(char* dst, const char* src, int64_t n, int64_t stride, const int64_t* index) {
  U* d = reinterpret_cast<U*>(dst);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t k = index ? index[j] : j;
    std::memcpy(d + j, src + k * stride, sizeof(U));
  }
}

void copy_row_any(char* dst, const char* src, int64_t n, int64_t stride, const int64_t* index, int64_t size) {
  switch (size) {
    case 1: return copy_row<uint8_t>(dst, src, n, stride, index);
    case 2: return copy_row<uint16_t>(dst, src, n, stride, index);
    case 4: return copy_row<uint32_t>(dst, src, n, stride, index);
    case 8: return copy_row<uint64_t>(dst, src, n, stride, index);
    default:
      for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * size, src + (index ? index[j] : j) * stride, size);
  }
}

}  // namespace

at::Tensor gather_cpu(const at::Tensor& src, int64_t dim, const at::Tensor& index) {
  dim = check_gather_args(src, dim, index, at::kCPU);
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const int64_t n_index = idx.numel(), extent = src.size(dim);
  for (int64_t k = 0; k < n_index; ++k) {
    TORCH_CHECK(ip[k] >= 0 && ip[k] < extent, "gather: index[", k, "] = ", ip[k], " is out of range [0, ",
                extent, ") for dim ", dim, " of src with shape ", src.sizes());
  }
  auto sizes = src.sizes().vec();
  sizes[dim] = n_index;
  at::Tensor out = at::empty(sizes, src.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const int64_t ndim = src.dim(), last = ndim - 1, es = src.element_size();
  std::vector<int64_t> byte_strides(ndim);
  for (int64_t d = 0; d < ndim; ++d) byte_strides[d] = src.stride(d) * es;
  const int64_t len = sizes[last], n_rows = out.numel() / len;
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 16384 / len);

  at::parallel_for(0, n_rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      int64_t rem = row, offset = 0;
      for (int64_t d = last - 1; d >= 0; --d) {
        const int64_t i = rem % sizes[d];
        rem /= sizes[d];
        offset += (d == dim ? ip[i] : i) * byte_strides[d];
      }
      char* dst = op + row * len * es;
      const char* s = sp + offset;
      if (dim == last) {
        copy_row_any(dst, s, len, byte_strides[last], ip, es);
      } else if (byte_strides[last] == es) {
        std::memcpy(dst, s, len * es);
      } else {
        copy_row_any(dst, s, len, byte_strides[last], nullptr, es);
      }
    }
  });
  return out;
}

}  // namespace fastprune
