// Python module fastprune._native._C: plain functions; fastprune/backends.py registers them with the dispatcher.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <atomic>

#include "ops.h"

namespace {

// How many threads at::parallel_for gives this module's kernels over a large range: 1 when the
// module was compiled without OpenMP (ATen then runs the loop inline), whatever torch's setting.
int64_t parallel_threads() {
  std::atomic<int64_t> seen{0};
  at::parallel_for(0, int64_t{1} << 16, 1, [&](int64_t, int64_t) {
    int64_t t = at::get_thread_num() + 1;
    int64_t cur = seen.load();
    while (t > cur && !seen.compare_exchange_weak(cur, t)) {
    }
  });
  return seen.load();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.doc() = "fastprune's compiled kernels (C++ for the CPU, CUDA when built with it)";
  // the torch this module was compiled against: the loader refuses it under any other torch
  m.attr("torch_version") = TORCH_VERSION;
  m.def("parallel_threads", &parallel_threads, release_gil(),
        "Threads at::parallel_for uses in this module (1 without OpenMP)");
  m.def("taylor_accumulate_cpu", &fastprune::taylor_accumulate_cpu, release_gil(),
        "Fused Taylor partial sums of w*g into rows/cols (CPU)", py::arg("weight"), py::arg("grad"),
        py::arg("rows"), py::arg("cols"), py::arg("row_block") = 1, py::arg("col_block") = 1);
  m.def("gather_cpu", &fastprune::gather_cpu, release_gil(), "Compaction copy along dim (CPU)",
        py::arg("src"), py::arg("dim"), py::arg("index"));
#ifdef FASTPRUNE_WITH_CUDA
  m.def("taylor_accumulate_cuda", &fastprune::taylor_accumulate_cuda, release_gil(),
        "Fused Taylor partial sums of w*g into rows/cols (CUDA)", py::arg("weight"), py::arg("grad"),
        py::arg("rows"), py::arg("cols"), py::arg("row_block") = 1, py::arg("col_block") = 1);
  m.def("gather_cuda", &fastprune::gather_cuda, release_gil(), "Compaction copy along dim (CUDA)",
        py::arg("src"), py::arg("dim"), py::arg("index"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
