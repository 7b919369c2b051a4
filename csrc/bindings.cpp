// pybind11 bindings for the bitnet engine: the only file that includes pybind11.
#include <pybind11/pybind11.h>

#ifndef BITNET_VERSION
#define BITNET_VERSION "0.0.0"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "bitnet_train C++ engine";
  m.def("version", [] { return std::string(BITNET_VERSION); }, "Engine version string.");
}
