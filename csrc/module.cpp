// pybind11 bindings of prostate_kernels._C. The Python side (prostate_kernels/ops/window_ops.py)
// registers these as torch.library custom ops; they release the GIL while they run.
#include "sliding_window.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prostate_kernels C++ extension: sliding-window gather, accumulation and normalisation";
  m.def("window_gather", &prostate_kernels::window_gather, "Copy windows out of a (N, C, D, H, W) volume",
        py::arg("volume"), py::arg("starts"), py::arg("roi"), py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("window_accumulate_", &prostate_kernels::window_accumulate_,
        "Accumulate importance-weighted windows into float32 output and weight buffers", py::arg("output"),
        py::arg("weight"), py::arg("windows"), py::arg("starts"), py::arg("importance"),
        py::call_guard<py::gil_scoped_release>());
  m.def("window_normalize_", &prostate_kernels::window_normalize_,
        "Divide the accumulated output by the accumulated weight", py::arg("output"), py::arg("weight"),
        py::call_guard<py::gil_scoped_release>());
  m.def("window_normalize_by_positions_", &prostate_kernels::window_normalize_by_positions_,
        "Divide the accumulated output by the weight map of windows at the given positions", py::arg("output"),
        py::arg("positions"), py::arg("importance"), py::call_guard<py::gil_scoped_release>());
  m.attr("OPENMP") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
}
