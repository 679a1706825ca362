// depthvid._C: the op schemas (declared once here; each device's implementations register in the
// file that implements them) and a minimal Python module that records what it was built with.
// No pybind11: ops are called through torch.ops.depthvid, fake kernels and autograd are
// registered from Python (depthvid/extension/).
#include <Python.h>
#include <torch/library.h>

#ifndef DEPTHVID_TORCH_VERSION
#define DEPTHVID_TORCH_VERSION "unknown"
#endif
#ifndef DEPTHVID_CUDA_ARCHS
#define DEPTHVID_CUDA_ARCHS ""
#endif
#ifndef DEPTHVID_WITH_CUDA
#define DEPTHVID_WITH_CUDA 0
#endif
// at::parallel_for's `#pragma omp parallel` is inline header code compiled into our objects: without
// -fopenmp (no _OPENMP) every CPU kernel runs on one thread, silently.
#ifdef _OPENMP
#define DEPTHVID_WITH_OPENMP 1
#else
#define DEPTHVID_WITH_OPENMP 0
#endif

TORCH_LIBRARY(depthvid, m) {
  // attention ops: q, k, v (batch*frames, heads, tokens, head_dim); lse (batch*frames, heads, tokens) fp32
  m.def("sparse_causal_attn_fwd(Tensor q, Tensor k, Tensor v, int num_frames, float scale) -> (Tensor, Tensor)");
  m.def(
      "sparse_causal_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int num_frames, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("temporal_attn_fwd(Tensor q, Tensor k, Tensor v, int num_frames, float scale) -> (Tensor, Tensor)");
  m.def(
      "temporal_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, int num_frames, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  // pseudo-3D conv prologue: x (B, C, F, H, W) -> (silu(group_norm(x)) as (B*F, C, H, W), mean, rstd (B*F, groups))
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_silu_bwd(Tensor grad, Tensor x, Tensor mean, Tensor rstd, int num_groups, Tensor? weight, "
      "Tensor? bias) -> (Tensor, Tensor, Tensor)");
  // epilogue: conv (B*F, C, H, W) -> (conv + temb + residual) / output_scale as (B, C, F, H, W)
  m.def("conv_epilogue(Tensor conv, int num_frames, Tensor? temb, Tensor? residual, float output_scale) -> Tensor");
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "depthvid's C++/CUDA ops (torch.ops.depthvid)", -1,
                               nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "torch_version", DEPTHVID_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", DEPTHVID_CUDA_ARCHS) < 0 ||
      PyModule_AddObject(m, "with_cuda", PyBool_FromLong(DEPTHVID_WITH_CUDA)) < 0 ||
      PyModule_AddObject(m, "with_openmp", PyBool_FromLong(DEPTHVID_WITH_OPENMP)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
