#include <pybind11/pybind11.h>
namespace py = pybind11;
PYBIND11_MODULE(_C, m) { m.doc() = "rega-engine C++ core"; }
