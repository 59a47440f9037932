// The fdiv op schemas (one TORCH_LIBRARY block for the whole namespace) and the Python module.
//
// `import fdiv_kernels._C` only has to load this shared object: the static registrars below and
// in csrc/cpu/*.cpp then make the ops visible as torch.ops.fdiv.*. The module itself is empty.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fdiv, m) {
  m.def(
      "divergence_fwd_cpu(Tensor student, Tensor teacher, Tensor valid, int kind, bool swap, "
      "float param, float inv_temperature, bool grad_student, bool grad_teacher) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher)");
  m.def(
      "softmax_stats_fwd_cpu(Tensor x, Tensor? labels, int ignore_index, float inv_temperature, "
      "bool entropy) -> (Tensor lse, Tensor entropy, Tensor label_logprob)");
  m.def(
      "softmax_stats_bwd_cpu(Tensor x, Tensor? labels, Tensor lse, Tensor entropy, Tensor? g_lse, "
      "Tensor? g_entropy, Tensor? g_logprob, int ignore_index, float inv_temperature) -> Tensor");
  m.def(
      "sinkhorn_lse_cpu(Tensor? x, Tensor? y, Tensor? cost, Tensor h, Tensor eps_inv, int kind, "
      "bool transpose, Tensor? active) -> Tensor");
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      nullptr,  // no docstring
      -1,  // no per-module state
      nullptr,  // no methods: everything is reached through torch.ops.fdiv
  };
  return PyModule_Create(&module_def);
}
}
