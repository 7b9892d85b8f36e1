// Fused Taylor partial sums on the CPU: one read of weight and grad per element.
//
// Rows are cut into a fixed number of chunks that depends only on the shape (never on the
// thread count), so results are bitwise reproducible.  Each chunk writes its per-row sums and
// its own column partials; the partials are then added in chunk order.  Row sums use eight
// independent lanes, which the compiler turns into SIMD without reassociating anything.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "ops.h"

namespace fastprune {
namespace {

constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinRowsPerChunk = 16;
constexpr int kLanes = 8;

// Rows [r0, r1) of a (R, C) matrix: row sums into row_sums (3, R), column sums into part (3, C).
template <typename T, bool kUnitStride>
void reduce_rows(const T* w, const T* g, int64_t r0, int64_t r1, int64_t R, int64_t C, int64_t swr,
                 int64_t swc, int64_t sgr, int64_t sgc, float* row_sums, float* part) {
  float* ca = part;
  float* cs = part + C;
  float* cq = part + 2 * C;
  const int64_t wc = kUnitStride ? 1 : swc;
  const int64_t gc = kUnitStride ? 1 : sgc;
  for (int64_t r = r0; r < r1; ++r) {
    const T* wr = w + r * swr;
    const T* gr = g + r * sgr;
    float a[kLanes] = {}, s[kLanes] = {}, q[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= C; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float p = static_cast<float>(wr[(j + l) * wc]) * static_cast<float>(gr[(j + l) * gc]);
        const float ap = std::fabs(p);
        a[l] += ap;
        s[l] += p;
        q[l] += p * p;
        ca[j + l] += ap;
        cs[j + l] += p;
        cq[j + l] += p * p;
      }
    }
    for (int l = 0; j < C; ++j, ++l) {
      const float p = static_cast<float>(wr[j * wc]) * static_cast<float>(gr[j * gc]);
      const float ap = std::fabs(p);
      a[l] += ap;
      s[l] += p;
      q[l] += p * p;
      ca[j] += ap;
      cs[j] += p;
      cq[j] += p * p;
    }
    float ta = 0.f, ts = 0.f, tq = 0.f;
    for (int l = 0; l < kLanes; ++l) {
      ta += a[l];
      ts += s[l];
      tq += q[l];
    }
    row_sums[r] = ta;
    row_sums[R + r] = ts;
    row_sums[2 * R + r] = tq;
  }
}

// acc[k, b] += sum of sums[k, b * block .. (b + 1) * block) for a (3, N) buffer `sums`.
void fold_blocks(const float* sums, int64_t N, int64_t block, const at::Tensor& acc) {
  auto a = acc.accessor<float, 2>();
  const int64_t nb = N / block;
  for (int64_t k = 0; k < 3; ++k) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = sums + k * N + b * block;
      float t = 0.f;
      for (int64_t m = 0; m < block; ++m) t += p[m];
      a[k][b] += t;
    }
  }
}

void taylor_impl(const at::Tensor& w, const at::Tensor& g, const at::Tensor& rows, const at::Tensor& cols,
                 int64_t row_block, int64_t col_block) {
  const int64_t R = w.size(0), C = w.size(1);
  if (R == 0 || C == 0) return;
  int64_t chunks = std::clamp<int64_t>((R + kMinRowsPerChunk - 1) / kMinRowsPerChunk, 1, kMaxChunks);
  const int64_t rows_per_chunk = (R + chunks - 1) / chunks;
  chunks = (R + rows_per_chunk - 1) / rows_per_chunk;

  const auto opts = w.options().dtype(at::kFloat);
  at::Tensor row_sums = at::empty({3, R}, opts);
  at::Tensor parts = at::empty({chunks, 3, C}, opts);
  float* rs = row_sums.data_ptr<float>();
  float* pp = parts.data_ptr<float>();
  const bool unit = w.stride(1) == 1 && g.stride(1) == 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "taylor_accumulate_cpu", [&] {
    const auto* wp = w.const_data_ptr<scalar_t>();
    const auto* gp = g.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float* part = pp + c * 3 * C;
        std::fill(part, part + 3 * C, 0.f);
        const int64_t r0 = c * rows_per_chunk, r1 = std::min(R, r0 + rows_per_chunk);
        if (unit) {
          reduce_rows<scalar_t, true>(wp, gp, r0, r1, R, C, w.stride(0), 1, g.stride(0), 1, rs, part);
        } else {
          reduce_rows<scalar_t, false>(wp, gp, r0, r1, R, C, w.stride(0), w.stride(1), g.stride(0),
                                       g.stride(1), rs, part);
        }
      }
    });
  });

  // Column totals: chunk partials added in chunk order, columns in parallel.
  at::Tensor col_sums = at::empty({3, C}, opts);
  float* cs = col_sums.data_ptr<float>();
  at::parallel_for(0, 3 * C, 2048, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float t = 0.f;
      for (int64_t c = 0; c < chunks; ++c) t += pp[c * 3 * C + i];
      cs[i] = t;
    }
  });
  fold_blocks(rs, R, row_block, rows);
  fold_blocks(cs, C, col_block, cols);
}

}  // namespace

void taylor_accumulate_cpu(const at::Tensor& weight, const at::Tensor& grad, const at::Tensor& rows,
                           const at::Tensor& cols, int64_t row_block, int64_t col_block) {
  check_taylor_args(weight, grad, rows, cols, row_block, col_block, at::kCPU);
  if (is_column_major_pair(weight, grad)) {
    taylor_impl(weight.t(), grad.t(), cols, rows, col_block, row_block);
  } else {
    taylor_impl(weight, grad, rows, cols, row_block, col_block);
  }
}

}  // namespace fastprune
