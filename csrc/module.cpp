// The Python module ppml._C. It has no functions of its own: importing it runs the TORCH_LIBRARY_IMPL blocks that
// register the CPU (and CUDA) kernels for the ops whose schemas ppml/ops/*.py define.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
