// CUDA dispatch-key implementations of the sgattn ops (the schemas are defined
// once, from Python: sgattn/_schemas.py). Compiled by the host
// compiler; the kernels sit behind the framework-free API of
// kernels/sgattn_cuda_api.h, so no torch header goes through nvcc.
//
// Every argument of a direct torch.ops.sgattn.* call is validated (the
// contract shared with the cpu binding in csrc/op_contract.h; devices and the
// kernels' limits here) with a ValueError naming the problem; index *values*
// are validated on the device (kernels/reallocation.cuh),
// so no op synchronises with the host. Outputs are contiguous. The module also
// exposes the launch planner (runs without a GPU), the device's shared-memory
// limit and a kernel-image probe to sgattn/backends/cuda.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <Python.h>

#include <array>
#include <atomic>
#include <cmath>
#include <limits>

#include "op_contract.h"
#include "sgattn_cuda_api.h"
#include "sgattn_op_names.h"

namespace {

using sgattn::DType;
constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();

// The kernels' dtype of a tensor the contract checked (float32, float16, bfloat16).
DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: return DType::F32;
  }
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": the cuda kernel launch failed: ", cudaGetErrorString(err));
}

// All tensors defined, on CUDA, on the device of the first one.
void check_devices(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const at::Tensor* first = ts.begin()->second;
  const char* first_name = ts.begin()->first;
  for (const auto& [name, t] : ts) {
    TORCH_CHECK_VALUE(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK_VALUE(t->is_cuda(), op, ": ", name, " must be a CUDA tensor (this is the cuda kernel), got a tensor on ",
                      t->device());
    TORCH_CHECK_VALUE(t->device() == first->device(), op, ": ", name, " is on ", t->device(), " but ", first_name,
                      " is on ", first->device(), "; all tensors must be on the same CUDA device");
  }
}

// Opt-in shared memory per block of the current device, queried once per device.
size_t max_smem_optin(const char* op) {
  static std::array<std::atomic<int>, 64> cache{};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), op);
  if (dev >= 0 && dev < 64 && cache[dev].load(std::memory_order_relaxed) > 0) return cache[dev].load();
  int bytes = 0;
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), op);
  if (dev >= 0 && dev < 64) cache[dev].store(bytes);
  return static_cast<size_t>(bytes);
}

void strides_of(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
}

// The contract (csrc/op_contract.h), then the kernels' own limits; fills the sizes of p.
sgattn::AttnParams attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  double scale, int64_t window, int64_t H, int64_t W, bool need_importance) {
  const auto [B, h, N, M, d, dv] = sgattn::contract::check_attention(op, q, k, v, scale, window, H, W,
                                                                     need_importance);
  TORCH_CHECK_VALUE(dv == d, op, ": the cuda kernels need the value head dim dv = ", dv, " to equal the head dim d = ",
                    d);
  TORCH_CHECK_VALUE(d <= sgattn::kMaxHeadDim, op, ": head dim d = ", d, " is outside 1..", sgattn::kMaxHeadDim,
                    " (the cuda kernels)");
  TORCH_CHECK_VALUE(N <= kI32Max && M <= kI32Max, op, ": the cuda kernels need N = ", N, " and M = ", M,
                    " below 2^31");
  TORCH_CHECK_VALUE(window <= 46340, op, ": window*window overflows 32 bits in the cuda kernels (window = ", window,
                    ")");
  sgattn::AttnParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  strides_of(q, p.q_stride);
  strides_of(k, p.k_stride);
  strides_of(v, p.v_stride);
  p.B = B; p.h = h; p.N = N; p.M = M; p.d = d;
  p.scale = static_cast<float>(scale);
  p.window = window; p.H = window > 0 ? H : 0; p.W = window > 0 ? W : 0;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, double scale,
                                                                  int64_t window, int64_t H, int64_t W,
                                                                  bool need_importance) {
  const char* op = "attention_fwd";
  check_devices(op, {{"q", &q}, {"k", &k}, {"v", &v}});
  sgattn::AttnParams p = attention_args(op, q, k, v, scale, window, H, W, need_importance);
  const DType dt = dtype_of(q);
  const int64_t B = p.B, h = p.h, N = p.N, M = p.M, d = p.d;
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({B, h, N, d}, q.options());
  auto lse = at::empty({B, h, N}, q.options().dtype(at::kFloat));
  const int64_t ncols = window > 0 ? N : M;
  auto fopts = q.options().dtype(at::kFloat);
  if (B * h == 0) {  // nothing to launch (the contract refuses importance over no heads)
    return {out, lse, need_importance ? at::empty({B, ncols}, fopts) : at::empty({0}, fopts)};
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const sgattn::AttnPlan plan = sgattn::plan_attention(dt, p, max_smem_optin(op));
  TORCH_CHECK_VALUE(plan.error == nullptr, op, ": the cuda kernels cannot run these sizes: ", plan.error);

  at::Tensor partial, imp = at::empty({0}, fopts);
  if (need_importance) {
    partial = at::empty({plan.partial_elems}, fopts);
    imp = at::empty({B, plan.ncols}, fopts);
  }
  check_cuda(sgattn::attention_forward(dt, p, plan, need_importance ? partial.data_ptr<float>() : nullptr,
                                       need_importance ? imp.data_ptr<float>() : nullptr,
                                       c10::cuda::getCurrentCUDAStream().stream()),
             op);
  return {out, lse, imp};
}

// dq, dk, dv by the fused backward kernels (kernels/attention_bwd.cuh) from
// the forward's out and lse (the forward is not rerun).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse_in,
                                                                  double scale, int64_t window, int64_t H,
                                                                  int64_t W) {
  const char* op = "attention_bwd";
  check_devices(op, {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse_in}});
  sgattn::AttnParams p = attention_args(op, q, k, v, scale, window, H, W, false);
  sgattn::contract::check_attention_grads(op, {p.B, p.h, p.N, p.M, p.d, p.d}, q, dout, out, lse_in);
  const DType dt = dtype_of(q);
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = p.B, h = p.h, N = p.N, M = p.M, d = p.d;
  auto dq = at::empty({B, h, N, d}, q.options());
  auto dk = at::empty({B, h, M, d}, q.options());
  auto dv = at::empty({B, h, M, d}, q.options());
  if (B * h * N == 0) {  // no query: no gradient reaches k or v
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const sgattn::AttnPlan plan = sgattn::plan_attention(dt, p, max_smem_optin(op));
  TORCH_CHECK_VALUE(plan.error == nullptr, op, ": the cuda kernels cannot run these sizes: ", plan.error);
  TORCH_CHECK_VALUE(plan.bwd_error == nullptr, op, ": the cuda kernels cannot run these sizes: ", plan.bwd_error);
  // Every real key is a key of exactly one segment (window), so the kernels write every row of dk, dv.
  auto fopts = q.options().dtype(at::kFloat);
  const at::Tensor lse = lse_in.contiguous();  // read by row, [B, h, N]
  auto delta = at::empty({B, h, N}, fopts);
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());  // read only by the backward kernels
  sgattn::AttnBwdArgs g{};
  g.dout = dout.const_data_ptr();
  strides_of(dout, g.do_stride);
  g.out = out.const_data_ptr();
  strides_of(out, g.out_stride);
  g.delta = delta.data_ptr<float>();
  at::Tensor kv_partial;
  if (plan.kv_partial_elems > 0) {
    kv_partial = at::empty({plan.kv_partial_elems}, fopts);
    g.kv_partial = kv_partial.data_ptr<float>();
  }
  g.dq = dq.data_ptr();
  g.dk = dk.data_ptr();
  g.dv = dv.data_ptr();
  check_cuda(sgattn::attention_backward(dt, p, plan, g, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {dq, dk, dv};
}

// The contract (csrc/op_contract.h), then the kernels' own limits (index values are checked on the device).
sgattn::ReallocArgs realloc_args(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weights,
                                 const at::Tensor* biases, c10::IntArrayRef group_sizes, const char* op) {
  const sgattn::ReallocPlan plan =
      sgattn::contract::check_aggregate(op, x, index, weights, biases, group_sizes, false);
  for (auto r : group_sizes) {
    TORCH_CHECK_VALUE(r <= sgattn::kMaxGroupSize, op, ": the cuda kernels take group sizes up to ",
                      sgattn::kMaxGroupSize, ", got ", group_sizes);
  }
  const int64_t G = index.size(0), B = x.size(0), N = x.size(1), C = x.size(2);
  sgattn::ReallocArgs a{};
  a.plan = plan;
  a.G = G; a.B = B; a.N = N; a.C = C;
  // Launch limits: forward one block per output row, backward one warp per token / row.
  TORCH_CHECK_VALUE(G == 0 || B == 0 || a.plan.M == 0 || G * B <= kI32Max / a.plan.M, op,
                    ": G*B*M = ", G, "*", B, "*", a.plan.M, " output rows exceed one cuda launch (2^31-1)");
  TORCH_CHECK_VALUE(B * N / 8 < kI32Max && G * B * N / 256 < kI32Max, op, ": G*B*N = ", G, "*", B, "*", N,
                    " tokens exceed one cuda launch");
  return a;
}

// The aggregation bindings follow the cpu binding's (csrc/cpu_ops.cpp) steps on
// purpose (contract checks, contiguous inputs, an empty result early, one
// kernel call); what differs is the dispatch: a DType enum across the nvcc
// boundary here, dtype templates there.
at::Tensor aggregate_fwd_cuda(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& weights,
                              const at::Tensor& biases, c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_fwd";
  check_devices(op, {{"x", &x_in}, {"index", &index_in}, {"weights", &weights}, {"biases", &biases}});
  sgattn::ReallocArgs a = realloc_args(x_in, index_in, weights, &biases, group_sizes, op);
  const DType dt = dtype_of(x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous(), index = index_in.contiguous(), w = weights.contiguous(), b = biases.contiguous();
  auto out = at::empty({a.G, a.B, a.plan.M, a.C}, x.options());
  if (out.numel() == 0) return out;
  a.x = x.const_data_ptr(); a.index = index.const_data_ptr<int64_t>();
  a.weights = w.const_data_ptr(); a.biases = b.const_data_ptr(); a.out = out.data_ptr();
  check_cuda(sgattn::realloc_forward(dt, a, c10::cuda::getCurrentCUDAStream().stream()), op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                  const at::Tensor& index_in, const at::Tensor& weights,
                                                                  c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_bwd";
  check_devices(op, {{"grad", &grad_in}, {"x", &x_in}, {"index", &index_in}, {"weights", &weights}});
  sgattn::ReallocArgs a = realloc_args(x_in, index_in, weights, nullptr, group_sizes, op);
  sgattn::contract::check_aggregate_grad(op, a.plan, x_in, index_in, grad_in);
  const DType dt = dtype_of(x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous(), index = index_in.contiguous(), w = weights.contiguous(), grad = grad_in.contiguous();
  auto dx = at::empty({a.B, a.N, a.C}, x.options());
  auto dw = at::empty({w.numel()}, x.options());
  auto db = at::empty({a.plan.P}, x.options());
  auto inv = at::empty({a.G, a.B, a.N}, index.options());
  auto dots = at::empty({a.G, a.B, a.N}, x.options().dtype(at::kFloat));
  auto rowsums = at::empty({a.G, a.B, a.plan.M}, x.options().dtype(at::kFloat));
  if (a.G == 0 && a.B * a.N * a.C > 0) dx.zero_();  // no ordering reaches x
  a.x = x.const_data_ptr(); a.index = index.const_data_ptr<int64_t>(); a.weights = w.const_data_ptr();
  check_cuda(sgattn::realloc_backward(dt, a, grad.const_data_ptr(), dx.data_ptr(), inv.data_ptr<int64_t>(),
                                      dots.data_ptr<float>(), rowsums.data_ptr<float>(), dw.data_ptr(), db.data_ptr(),
                                      w.numel(), c10::cuda::getCurrentCUDAStream().stream()),
             op);
  return {dx, dw, db};
}

// ------------------------------------------------------------ module functions

DType dtype_from_name(const char* name, bool* ok) {
  *ok = true;
  const std::string s(name);
  if (s == "float32") return DType::F32;
  if (s == "float16") return DType::F16;
  if (s == "bfloat16") return DType::BF16;
  *ok = false;
  return DType::F32;
}

// plan_attention(dtype, B, h, N, M, d, window, H, W, max_smem) -> dict; no GPU needed.
PyObject* py_plan_attention(PyObject*, PyObject* args) {
  const char* dtype = nullptr;
  long long B, h, N, M, d, window, H, W, max_smem;
  if (!PyArg_ParseTuple(args, "sLLLLLLLLL", &dtype, &B, &h, &N, &M, &d, &window, &H, &W, &max_smem)) return nullptr;
  bool ok = false;
  const DType dt = dtype_from_name(dtype, &ok);
  if (!ok) {
    PyErr_SetString(PyExc_ValueError, "dtype must be 'float32', 'float16' or 'bfloat16'");
    return nullptr;
  }
  sgattn::AttnParams p{};
  p.B = B; p.h = h; p.N = N; p.M = M; p.d = d; p.window = window; p.H = H; p.W = W;
  const sgattn::AttnPlan plan = sgattn::plan_attention(dt, p, static_cast<size_t>(max_smem));
  if (plan.error != nullptr) return Py_BuildValue("{s:s}", "error", plan.error);
  PyObject* bwd_error = plan.bwd_error ? PyUnicode_FromString(plan.bwd_error) : (Py_INCREF(Py_None), Py_None);
  PyObject* res = Py_BuildValue(
      "{s:O,s:i,s:i,s:n,s:n,s:L,s:L,s:L,s:L,s:L,s:N,s:i,s:i,s:n,s:n,s:L,s:L,s:L,s:O}", "error", Py_None, "warps", plan.warps,
      "QT", plan.QT, "smem", static_cast<Py_ssize_t>(plan.smem), "imp_smem", static_cast<Py_ssize_t>(plan.imp_smem),
      "fwd_blocks", (long long)plan.fwd_blocks, "imp_blocks", (long long)plan.imp_blocks, "splits",
      (long long)plan.splits, "ktiles", (long long)plan.ktiles, "partial_elems", (long long)plan.partial_elems,
      "bwd_error", bwd_error, "kv_warps", plan.kv_warps, "dq_warps", plan.dq_warps, "kv_smem",
      static_cast<Py_ssize_t>(plan.kv_smem), "dq_smem", static_cast<Py_ssize_t>(plan.dq_smem), "kv_blocks",
      (long long)plan.kv_blocks, "dq_blocks", (long long)plan.dq_blocks, "kv_splits", (long long)plan.kv_splits, "o_in_s", plan.o_in_s ? Py_True : Py_False);
  return res;
}

// device_smem_optin(device_index) -> int (opt-in shared memory per block, bytes).
PyObject* py_device_smem_optin(PyObject*, PyObject* args) {
  int dev = 0;
  if (!PyArg_ParseTuple(args, "i", &dev)) return nullptr;
  int bytes = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) {
    PyErr_SetString(PyExc_RuntimeError, cudaGetErrorString(err));
    return nullptr;
  }
  return PyLong_FromLong(bytes);
}

// probe(device_index) -> None, or why the kernels cannot run on that device.
PyObject* py_probe(PyObject*, PyObject* args) {
  int dev = 0;
  if (!PyArg_ParseTuple(args, "i", &dev)) return nullptr;
  int prev = 0;
  cudaError_t err = cudaGetDevice(&prev);
  if (err == cudaSuccess) err = cudaSetDevice(dev);
  if (err == cudaSuccess) {
    err = sgattn::probe_kernel_image();
    cudaSetDevice(prev);
  }
  if (err == cudaSuccess) Py_RETURN_NONE;
  cudaGetLastError();  // clear a non-sticky error
  return PyUnicode_FromFormat("the CUDA kernels cannot run on device %d: %s (%s); rebuild with its architecture in "
                              "TORCH_CUDA_ARCH_LIST",
                              dev, cudaGetErrorName(err), cudaGetErrorString(err));
}

PyMethodDef methods[] = {
    {"plan_attention", py_plan_attention, METH_VARARGS,
     "plan_attention(dtype, B, h, N, M, d, window, H, W, max_smem) -> dict: the attention kernels' launch plan "
     "('error' is None or why they cannot run)"},
    {"device_smem_optin", py_device_smem_optin, METH_VARARGS, "opt-in shared memory per block of a device (bytes)"},
    {"probe", py_probe, METH_VARARGS, "None if a kernel image for the device exists, else the reason"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

SGATTN_IMPL_OPS(CUDA, _cuda)  // the functions above: op name + _cuda

static PyModuleDef sgattn_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                         "sgattn CUDA kernels for the torch.ops.sgattn.* ops", -1, methods};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&sgattn_cuda_module); }
