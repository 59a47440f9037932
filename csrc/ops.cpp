// The fdiv op schemas (one TORCH_LIBRARY block for the whole namespace) and the Python module.
//
// `import fdiv_kernels._C` only has to load this shared object: the static registrars below and
// in csrc/cpu/*.cpp then make the ops visible as torch.ops.fdiv.*. The module itself is empty.
#include <Python.h>
#include <torch/library.h>

#include <string>

// The divergence and softmax-statistics ops exist once per C++ backend, as `<op>_<backend>`, all
// declared from the one schema below (the Python backends' custom ops take the same arguments).
// csrc/cpu/*.cpp implement the `_cpu` ones; csrc/cuda/bindings.cpp the `_cuda` ones, which a
// CPU-only build neither compiles nor declares (the Python side tests for their presence).
constexpr const char* kCppBackends[] = {
    "cpu",
#ifdef FDIV_WITH_CUDA
    "cuda",
#endif
};

// (op, schema after the name)
constexpr const char* kPerBackendOps[][2] = {
    {"divergence_fwd",
     "(Tensor student, Tensor teacher, Tensor valid, int kind, bool swap, float param, "
     "float inv_temperature, float student_scale, float student_softcap, float teacher_scale, "
     "float teacher_softcap, bool grad_student, bool grad_teacher) "
     "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher, Tensor entropy)"},
    {"softmax_stats_fwd",
     "(Tensor x, Tensor? labels, int ignore_index, float inv_temperature, float scale, "
     "float softcap, bool entropy) "
     "-> (Tensor lse, Tensor entropy, Tensor label_logprob)"},
    {"softmax_stats_bwd",
     "(Tensor x, Tensor? labels, Tensor lse, Tensor entropy, Tensor? g_lse, Tensor? g_entropy, "
     "Tensor? g_logprob, int ignore_index, float inv_temperature, float scale, float softcap) "
     "-> Tensor"},
};

TORCH_LIBRARY(fdiv, m) {
  for (const char* backend : kCppBackends)
    for (const auto& op : kPerBackendOps)
      m.def((std::string(op[0]) + "_" + backend + op[1]).c_str());
  m.def(
      "sinkhorn_lse_cpu(Tensor? x, Tensor? y, Tensor? cost, Tensor h, Tensor eps_inv, int kind, "
      "bool transpose, Tensor? active) -> Tensor");
  m.def(
      "sinkhorn_solve_cpu(Tensor? x, Tensor? y, Tensor? cost, Tensor log_a, Tensor log_b, "
      "Tensor? f0, Tensor? g0, Tensor? eps_levels, float eps, int kind, float rho_a, "
      "float rho_b, int max_iter, float tol, int check_every, bool symmetric) "
      "-> (Tensor f, Tensor g, Tensor n_iter, Tensor err)");
  m.def(
      "sinkhorn_totals_cpu(Tensor? x, Tensor? y, Tensor? cost, Tensor a, Tensor b, Tensor f, "
      "Tensor g, float eps, int kind) -> (Tensor total, Tensor lin)");
  m.def(
      "sinkhorn_grads_cpu(Tensor? x, Tensor? y, Tensor? cost, Tensor a, Tensor b, Tensor f, "
      "Tensor g, Tensor g_value, Tensor? lam_f, Tensor? lam_g, float eps, int kind, float rho_a, "
      "float rho_b, bool[5] need) -> (Tensor grad_x, Tensor grad_y, Tensor grad_cost, "
      "Tensor grad_a, Tensor grad_b)");
  m.def(
      "sinkhorn_plan_apply_cpu(Tensor? x, Tensor? y, Tensor? cost, Tensor a, Tensor b, "
      "Tensor f, Tensor g, float eps, int kind, Tensor vf, Tensor vg) "
      "-> (Tensor pv, Tensor ptv, Tensor row_sums, Tensor col_sums)");
  m.def(
      "sinkhorn_unrolled_fwd_cpu(Tensor? x, Tensor? y, Tensor? cost, Tensor? a, Tensor? b, "
      "Tensor? f0, Tensor? g0, float eps, int kind, float rho_a, float rho_b, int n_iter, "
      "bool symmetric) -> (Tensor value, Tensor lin, Tensor f, Tensor g, Tensor err, "
      "Tensor tape)");
  m.def(
      "sinkhorn_unrolled_bwd_cpu(Tensor? x, Tensor? y, Tensor? cost, Tensor? a, Tensor? b, "
      "Tensor tape, Tensor? g_value, Tensor? g_lin, Tensor? g_f, Tensor? g_g, float eps, "
      "int kind, float rho_a, float rho_b, int n_iter, bool symmetric, bool[5] need) "
      "-> (Tensor grad_x, Tensor grad_y, Tensor grad_cost, Tensor grad_a, Tensor grad_b, "
      "Tensor grad_f0, Tensor grad_g0)");
}

// fk.sparse_divergence (a separate fragment so that it merges independently of the block above).
TORCH_LIBRARY_FRAGMENT(fdiv, m) {
  m.def(
      "sparse_divergence_fwd_cpu(Tensor student, Tensor ids, Tensor teacher, Tensor support, "
      "Tensor valid, int kind, bool swap, float param, float inv_temperature, int tail, "
      "float teacher_alpha, float mass_slack, float logit_scale, float softcap, "
      "bool grad_student, bool grad_teacher) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher, Tensor stats)");
  // The forward writing the student gradient over the student logits (the fused form's chunk).
  m.def(
      "sparse_divergence_fwd_inplace_cpu(Tensor(a!) student, Tensor ids, Tensor teacher, "
      "Tensor support, Tensor valid, int kind, bool swap, float param, float inv_temperature, "
      "int tail, float teacher_alpha, float mass_slack, float logit_scale, float softcap, "
      "bool grad_teacher) -> (Tensor loss, Tensor grad_teacher, Tensor stats)");
  m.def(
      "sparse_divergence_bwd_cpu(Tensor student, Tensor ids, Tensor teacher, Tensor support, "
      "Tensor valid, Tensor stats, Tensor grad_loss, int kind, bool swap, float param, "
      "float inv_temperature, int tail, float teacher_alpha, float logit_scale, float softcap) "
      "-> Tensor");
}

// fk.divergence(kind="cauchy_schwarz" / "renyi"): row divergences that are weighted sums of three
// log-sum-exps (csrc/cpu/lse_combination.cpp), with the logit transforms (scale, softcap 0 =
// none) fused; coeffs = (ca, cb, w) per term.
TORCH_LIBRARY_FRAGMENT(fdiv, m) {
  m.def(
      "lse_combination_fwd_cpu(Tensor student, Tensor teacher, Tensor valid, float[] coeffs, "
      "float inv_temperature, float student_scale, float student_softcap, float teacher_scale, "
      "float teacher_softcap, bool grad_student, bool grad_teacher) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher)");
}

// fk.topk_logprobs (csrc/cpu/topk_logprobs.cpp): each row's k largest transformed logits (ids,
// values) and its (max, log-sum), one read of the row.
TORCH_LIBRARY_FRAGMENT(fdiv, m) {
  m.def(
      "topk_logprobs_fwd_cpu(Tensor x, int k, float inv_temperature, float scale, "
      "float softcap) -> (Tensor ids, Tensor values, Tensor stats)");
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
