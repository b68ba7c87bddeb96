// Python extension module allocmoe_ext._C. Importing it runs the static TORCH_LIBRARY
// registrations of this shared library; the module itself reports how it was built and holds
// the switch for data-dependent validation (see validation.h).
#include <pybind11/pybind11.h>

#include "validation.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "allocmoe_ext native operators (registered under torch.ops.allocmoe)";
#ifdef ALLOCMOE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("set_validation", &allocmoe::set_validation_enabled, "Check data-dependent input errors on CUDA (syncs)");
  m.def("validation_enabled", &allocmoe::validation_enabled);
}
