// The opt-in native autograd node of batchnorm.torch's eager CPU training route
// (batchnorm/adapters/torch/native.py builds and loads this file).
//
// A torch::autograd::Function (a C++ node: no Python in the step) whose forward and
// backward call the library's compiled numba kernels through their C entry points
// (batchnorm/backends/numba/centry.py), whose addresses Python hands over once
// (set_kernels). No maths here: only allocation, argument plumbing and the fallbacks.
//
// Layouts (the Python route's one-call views): kind 1 = ROWS, the input viewed (a0, a1) =
// (O, K); kind 2 = WIDE, viewed (a0, a1, a2) = (N, C, I). The input is float32 or float64
// and dense in that view; weight and bias are of its dtype or absent.
//
// Double backward (the backward run with grad mode on) and a batched or wrapped incoming
// gradient are handed to a Python function (set_fallback): the custom operator's backward,
// which is differentiable and has a vmap rule.
#include <torch/extension.h>

#include <torch/csrc/autograd/custom_function.h>

#include "pool.h"

#include <cstdint>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TrainRows = int32_t (*)(void*, void*, void*, double, double, double, void*, void*,
                              double*, int64_t, int64_t);
using TrainWide = int32_t (*)(void*, void*, void*, double, double, double, double, void*,
                              void*, double*, int64_t, int64_t, int64_t);
using Backward = int32_t (*)(void*, void*, double*, void*, void*, void*, void*, void*,
                             int64_t, int64_t, int64_t);
// The ROWS kernels on the columns [k0, k0 + w) of an (o, k) input (centry._train_cols_c,
// _backward_cols_c: the trailing k0, w), and plain_stats over all columns (stats, k, count,
// limit).
using TrainCols = int32_t (*)(void*, void*, void*, double, double, void*, void*, double*,
                              int64_t, int64_t, int64_t, int64_t);
using BackwardCols = int32_t (*)(void*, void*, double*, void*, void*, void*, void*, void*,
                                 int64_t, int64_t, int64_t, int64_t, int64_t);
using Plain = int32_t (*)(double*, int64_t, int64_t, double);
// running mean, running variance (the input's dtype), stats, c, keep, w, wv
using Update = int32_t (*)(void*, void*, double*, int64_t, double, double, double);

// The evaluation entry point (centry._eval_c) of one dtype combination: x, weight, bias,
// running mean, running variance, eps, limit, coef, y, n, c, i (0: an (n, c) view), nchunks.
using Eval = int32_t (*)(void*, void*, void*, void*, void*, double, double, void*, void*,
                         int64_t, int64_t, int64_t, int64_t);

struct Kernels {
  TrainRows train_rows = nullptr;
  TrainWide train_wide = nullptr;
  Backward backward_rows = nullptr;
  Backward backward_wide = nullptr;
  TrainCols train_cols = nullptr;
  BackwardCols backward_cols = nullptr;
  Plain plain = nullptr;
  Update update = nullptr;
  double big = 0.0, limit = 0.0, rescale = 1.0;
  int64_t serial_max = 0;  // plan.SERIAL_MAX: from this many elements, strips on threads
};

Kernels KERNELS[2];  // [0]: float32, [1]: float64
// [x * 16 + weight * 8 + bias * 4 + mean * 2 + var]: x 0/1/2 = float16/32/64, the vectors
// 0/1 = float32/64 (a missing weight or bias: float64 ones or zeros, as the Python route's)
Eval EVAL[48] = {};
double EVAL_LIMIT[48] = {};  // needs_general's bound of the x dtype, per entry point
pybind11::object* FALLBACK = nullptr;  // never freed: outlives the interpreter's teardown
thread_local bool PLAIN = false;  // the last forward's flag, read by train() right after
thread_local Tensor STATS;  // the last forward's statistics, read by train() likewise

constexpr int64_t ROWS = 1;

// Columns per block of a ROWS strip: whole cache lines of float32 (two of float64), so that
// two threads share no line of the statistics and, in rows that start on a line, of x's.
constexpr int64_t STRIP_BLOCK = 16;
// Fewest blocks in a strip: the kernels' time per value grows as strips narrow (one thread's
// forward + backward of half of (256, 1024) float32 in sub-strips of 512, 256, 128, 64, 32
// columns: 171, 216, 279, 374, 535 us), so 64-column strips on two threads gain nothing.
constexpr int64_t STRIP_MIN_BLOCKS = 8;

// f(k0, w) over the columns [0, k) of an (o, k) input in strips of whole blocks on torch's
// threads (at::parallel_for: one contiguous strip per thread, inline on one thread or inside
// a parallel region), each strip at least 128 columns and half the serial size (a smaller
// one costs more to hand to a thread than it saves). f writes only the caller's buffers,
// through the pointers it captured: the scratch of filled() and scratch() is the calling
// thread's.
template <class F>
void over_strips(int64_t o, int64_t k, int64_t serial_max, const F& f) {
  int64_t blocks = (k + STRIP_BLOCK - 1) / STRIP_BLOCK;
  int64_t grain = std::max(STRIP_MIN_BLOCKS, (serial_max / 2) / (o * STRIP_BLOCK));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    int64_t k0 = b0 * STRIP_BLOCK;
    f(k0, std::min(k, b1 * STRIP_BLOCK) - k0);
  });
}

// The ROWS training forward: one serial call below serial_max elements, else strips of
// columns (train_cols) on torch's threads, then plain_stats over all columns. The same bits
// either way: every column's values come from the same code whatever the strips.
int32_t train_rows(const Kernels& k, void* x, void* g, void* b, double eps, void* coef, void* y,
                   double* stats, int64_t o, int64_t c) {
  if (o * c < k.serial_max)
    return k.train_rows(x, g, b, eps, k.big, k.limit, coef, y, stats, o, c);
  over_strips(o, c, k.serial_max, [&](int64_t k0, int64_t w) {
    k.train_cols(x, g, b, eps, k.big, coef, y, stats, o, c, k0, w);
  });
  return k.plain(stats, c, o, k.limit);
}

// The ROWS backward likewise (backward_cols by strips; dx gets o_out rows: o or 0).
void backward_rows(const Kernels& k, void* x, void* dy, double* stats, void* g, void* coef,
                   void* dx, void* gw, void* gb, int64_t o, int64_t c, int64_t o_out) {
  if (o * c < k.serial_max) {
    k.backward_rows(x, dy, stats, g, coef, dx, gw, gb, o, c, o_out);
    return;
  }
  over_strips(o, c, k.serial_max, [&](int64_t k0, int64_t w) {
    k.backward_cols(x, dy, stats, g, coef, dx, gw, gb, o, c, o_out, k0, w);
  });
}

const Kernels& kernels_for(const Tensor& x) {
  const Kernels& k = KERNELS[x.scalar_type() == at::kDouble ? 1 : 0];
  TORCH_CHECK(k.train_rows != nullptr, "batchnorm native: kernels not registered for ",
              x.scalar_type());
  return k;
}

// A per-feature vector of `fill` in x's dtype (a missing weight or bias: slots 0, 1) or
// scratch (slots 2, 3: gradients nobody asked for), per thread.
void* filled(const Tensor& x, int64_t c, double fill, int slot) {
  thread_local std::vector<double> store[8];
  bool f64 = x.scalar_type() == at::kDouble;
  std::vector<double>& v = store[slot + (f64 ? 4 : 0)];
  int64_t n = f64 ? c : (c + 1) / 2;  // float32: two to a double
  if (static_cast<int64_t>(v.size()) < n) {
    v.assign(n, f64 ? fill : 0.0);
    if (!f64) {
      float* f = reinterpret_cast<float*>(v.data());
      for (int64_t i = 0; i < 2 * n; ++i) f[i] = static_cast<float>(fill);
    }
  }
  return v.data();
}

void* scratch(int64_t n) {  // the kernels' coefficient scratch (5 * C values)
  thread_local std::vector<double> s;
  if (static_cast<int64_t>(s.size()) < n) s.resize(n);
  return s.data();
}

// A dense CPU gradient that is no vmap's, no functorch wrapper's and no Python subclass's.
bool plain_gradient(const Tensor& dy) {
  static const c10::DispatchKeySet odd({c10::DispatchKey::FuncTorchBatched,
                                        c10::DispatchKey::Batched,
                                        c10::DispatchKey::FuncTorchGradWrapper,
                                        c10::DispatchKey::Python,
                                        c10::DispatchKey::Functionalize});
  return dy.layout() == at::kStrided && dy.device().is_cpu() && !dy.is_conj() &&
         !dy.is_neg() && (dy.key_set() & odd).empty();
}

at::MemoryFormat format_of(const Tensor& x, int64_t channels_last) {
  if (!channels_last) return at::MemoryFormat::Contiguous;
  return x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// Releases the GIL around a kernel call when this thread holds it.
struct NoGil {
  PyThreadState* state = nullptr;
  NoGil() {
    if (PyGILState_Check()) state = PyEval_SaveThread();
  }
  ~NoGil() {
    if (state != nullptr) PyEval_RestoreThread(state);
  }
};

constexpr size_t N_ARGS = 9;  // x, weight, bias, kind, a0, a1, a2, channels_last, eps

struct LeanFn : public torch::autograd::Function<LeanFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& wo,
                               const std::optional<Tensor>& bo, int64_t kind, int64_t a0, int64_t a1,
                               int64_t a2, int64_t channels_last, double eps) {
    const Kernels& k = kernels_for(x);
    Tensor w = wo.value_or(Tensor()), b = bo.value_or(Tensor());
    Tensor y = bnpool::empty_like(x);
    Tensor stats = at::empty({3, a1}, x.options().dtype(at::kDouble));
    void* g = w.defined() ? w.data_ptr() : filled(x, a1, 1.0, 0);
    void* bb = b.defined() ? b.data_ptr() : filled(x, a1, 0.0, 1);
    void* coef = scratch(5 * a1);
    int32_t plain;
    {
      NoGil nogil;  // the kernels hold no Python object
      plain = kind == ROWS
                  ? train_rows(k, x.data_ptr(), g, bb, eps, coef, y.data_ptr(),
                               stats.data_ptr<double>(), a0, a1)
                  : k.train_wide(x.data_ptr(), g, bb, eps, k.big, k.limit, k.rescale, coef,
                                 y.data_ptr(), stats.data_ptr<double>(), a0, a1, a2);
    }
    PLAIN = plain != 0;
    ctx->save_for_backward({x, w});  // in-place changes before the backward are detected
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["b"] = b.defined();
    ctx->saved_data["dims"] = std::vector<int64_t>{kind, a0, a1, a2, channels_last};
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);
    // the statistics leave through STATS, not as a second output: compiled autograd
    // (torch._dynamo) asserts on a node with non-differentiable outputs
    STATS = stats;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& w = saved[1];
    Tensor stats = ctx->saved_data["stats"].toTensor();
    bool has_b = ctx->saved_data["b"].toBool();
    std::vector<int64_t> d = ctx->saved_data["dims"].toIntVector();  // kind, a0, a1, a2, cl
    Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(x);  // as materialized
    variable_list out(N_ARGS);
    if (at::GradMode::is_enabled() || !plain_gradient(dy)) {
      // double backward, or a vmap over the gradient: the operator's backward (Python)
      pybind11::gil_scoped_acquire gil;
      TORCH_CHECK(FALLBACK != nullptr, "batchnorm native: no fallback backward registered");
      pybind11::object wo = w.defined() ? pybind11::cast(w) : pybind11::none();
      pybind11::tuple r =
          (*FALLBACK)(dy, x, wo, has_b, stats, ctx->saved_data["eps"].toDouble());
      for (size_t i = 0; i < 3; ++i)
        if (!r[i].is_none()) out[i] = r[i].cast<Tensor>();
      return out;
    }
    const Kernels& k = kernels_for(x);
    if (dy.scalar_type() != x.scalar_type()) dy = dy.to(x.scalar_type());
    at::MemoryFormat fmt = format_of(x, d[4]);
    if (!dy.is_contiguous(fmt)) dy = dy.contiguous(fmt);
    // the node's edges: x, then weight and bias where present
    bool need_dx = ctx->needs_input_grad(0);
    bool need_w = w.defined() && ctx->needs_input_grad(1);
    bool need_b = has_b && ctx->needs_input_grad(w.defined() ? 2 : 1);
    int64_t c = d[2];
    // WIDE: the fused kernel always writes dx (without need_dx, into a discarded tensor)
    Tensor dx = (need_dx || d[0] != ROWS) ? bnpool::empty_format(x, fmt) : Tensor();
    Tensor gw = need_w ? at::empty({c}, x.options()) : Tensor();
    Tensor gb = need_b ? at::empty({c}, x.options()) : Tensor();
    void* g = w.defined() ? w.data_ptr() : filled(x, c, 1.0, 0);
    void* gwp = need_w ? gw.data_ptr() : filled(x, c, 0.0, 2);
    void* gbp = need_b ? gb.data_ptr() : filled(x, c, 0.0, 3);
    void* coef = scratch(5 * c);
    void* dxp = dx.defined() ? dx.data_ptr() : nullptr;
    if (d[0] == ROWS)
      backward_rows(k, x.data_ptr(), dy.data_ptr(), stats.data_ptr<double>(), g, coef, dxp, gwp,
                    gbp, d[1], c, need_dx ? d[1] : 0);
    else
      k.backward_wide(x.data_ptr(), dy.data_ptr(), stats.data_ptr<double>(), g, coef, dxp, gwp,
                      gbp, d[1], c, d[3]);
    if (need_dx) out[0] = dx;
    out[1] = gw;
    out[2] = gb;
    return out;
  }
};

// The kernels read x as one dense block in the memory order of its view (a channels-last
// view only where the layout allows it: ``view_ok``).
void check_dense(const Tensor& x, int64_t channels_last, bool view_ok) {
  TORCH_CHECK(x.is_contiguous(format_of(x, channels_last)) && view_ok,
              "batchnorm native: the input of shape ", x.sizes(), " and strides ", x.strides(),
              " is not dense in the ", channels_last ? "channels-last" : "contiguous",
              " order of its view");
}

// (y, stats, plain): the training forward through the native node. stats (3, C) float64:
// mean, biased variance, 1/sqrt(var + eps); plain: the kernels' flag (false: the caller
// takes the Python route, which takes the general path where needed, and ignores y).
// The kernels read raw memory: every argument that sizes a read is checked first.
void check_args(const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b,
                int64_t kind, int64_t a0, int64_t a1, int64_t a2, int64_t channels_last) {
  TORCH_CHECK(kind == 1 || kind == 2, "batchnorm native: kind 1 (ROWS) or 2 (WIDE), got ",
              kind);
  TORCH_CHECK(x.device().is_cpu() && x.layout() == at::kStrided &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "batchnorm native: a dense float32/float64 CPU input, got ", x.toString());
  TORCH_CHECK(a0 > 0 && a1 > 0 && a2 > 0 && (kind == 2 || a2 == 1) &&
                  x.numel() == a0 * a1 * a2 && x.dim() >= 2 && x.size(1) == a1,
              "batchnorm native: view (", a0, ", ", a1, ", ", a2, ") of kind ", kind,
              " does not fit an input of shape ", x.sizes());
  check_dense(x, channels_last, channels_last == 0 || kind == 1);
  for (const std::optional<Tensor>* p : {&w, &b}) {
    if (!p->has_value() || !(*p)->defined()) continue;
    const Tensor& t = p->value();
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == x.scalar_type() &&
                    t.dim() == 1 && t.size(0) == a1 && t.is_contiguous(),
                "batchnorm native: weight and bias must be contiguous (", a1, ",) ",
                x.scalar_type(), " CPU tensors, got ", t.toString(), " of shape ", t.sizes());
  }
}

// Whether a tensor's memory is not its values: a lazy negation or conjugation
// (torch._neg_view, .conj()): the kernels read raw memory, so such calls are handed back
// to the Python route, which resolves them (numpy(force=True)).
bool lazy_bits(std::initializer_list<std::optional<Tensor>> ts) {
  for (const std::optional<Tensor>& t : ts)
    if (t.has_value() && t->defined() && (t->is_neg() || t->is_conj())) return true;
  return false;
}

// The running statistics as `update` writes them: both dense (a1,) CPU tensors of x's
// dtype, neither lazily negated (checked: the entry point writes raw memory).
bool updatable(const Tensor& x, const std::optional<Tensor>& rm,
               const std::optional<Tensor>& rv, int64_t a1) {
  for (const std::optional<Tensor>* p : {&rm, &rv}) {
    if (!p->has_value() || !(*p)->defined()) return false;
    const Tensor& t = p->value();
    if (!(t.device().is_cpu() && t.layout() == at::kStrided &&
          t.scalar_type() == x.scalar_type() && t.dim() == 1 && t.size(0) == a1 &&
          t.is_contiguous() && !t.is_neg() && !t.is_conj()))
      return false;
  }
  return true;
}

// (y, stats, plain, updated): the training forward through the native node and, where
// running statistics are given (and the plain form serves), their update in place with
// the weights keep, w, wv (torch's: keep = 1 - w, wv = w * n / (n - 1)): updated 1 done,
// 0 refused (a new value not finite: nothing changed, the caller raises), -1 not done
// (none given, or not of x's dtype and layout: the caller updates them).
std::tuple<Tensor, Tensor, bool, int64_t> train(
    const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b,
    int64_t kind, int64_t a0, int64_t a1, int64_t a2, int64_t channels_last, double eps,
    const std::optional<Tensor>& rm, const std::optional<Tensor>& rv, double keep,
    double wm, double wv) {
  check_args(x, w, b, kind, a0, a1, a2, channels_last);
  if (lazy_bits({x, w, b})) return {Tensor(), Tensor(), false, -1};  // the Python route's
  variable_list r = LeanFn::apply(x, w, b, kind, a0, a1, a2, channels_last, eps);
  Tensor stats = STATS;
  STATS = Tensor();
  int64_t updated = -1;
  if (PLAIN && updatable(x, rm, rv, a1)) {
    const Kernels& k = kernels_for(x);
    updated = k.update(rm->data_ptr(), rv->data_ptr(), stats.data_ptr<double>(), a1, keep, wm,
                       wv);
  }
  return {r[0], stats, PLAIN, updated};
}

// Returns whether at::parallel_for runs the strips on torch's threads (the extension built
// with them: -fopenmp for torch's OpenMP backend) rather than all in the calling thread.
bool set_kernels(int64_t index, const std::vector<int64_t>& addrs, double big, double limit,
                 double rescale, int64_t serial_max) {
  TORCH_CHECK(index == 0 || index == 1, "set_kernels: index 0 (float32) or 1 (float64)");
  TORCH_CHECK(addrs.size() == 8, "set_kernels: eight addresses (centry.NAMES), got ",
              addrs.size());
  TORCH_CHECK(serial_max > 0, "set_kernels: a positive serial size, got ", serial_max);
  Kernels& k = KERNELS[index];
  k.train_rows = reinterpret_cast<TrainRows>(addrs[0]);
  k.train_wide = reinterpret_cast<TrainWide>(addrs[1]);
  k.backward_rows = reinterpret_cast<Backward>(addrs[2]);
  k.backward_wide = reinterpret_cast<Backward>(addrs[3]);
  k.train_cols = reinterpret_cast<TrainCols>(addrs[4]);
  k.backward_cols = reinterpret_cast<BackwardCols>(addrs[5]);
  k.plain = reinterpret_cast<Plain>(addrs[6]);
  k.update = reinterpret_cast<Update>(addrs[7]);
  k.serial_max = serial_max;
  k.big = big;
  k.limit = limit;
  k.rescale = rescale;
#ifdef INTRA_OP_PARALLEL
  return true;
#else
  return false;
#endif
}

int64_t x_code(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return 0;
    case at::kFloat: return 1;
    case at::kDouble: return 2;
    default: return -1;
  }
}

// A per-feature float64 vector of `fill` (a missing weight: ones; bias: zeros), per thread.
double* filled64(int64_t c, double fill) {
  thread_local std::vector<double> store[2];
  std::vector<double>& v = store[fill == 0.0 ? 1 : 0];
  if (static_cast<int64_t>(v.size()) < c) v.assign(c, fill);
  return v.data();
}

// Every argument that sizes a read of evaluate() checked: a dense input viewed (a0, a1) (a2
// == 0) or (a0, a1, a2), and per-feature float32/64 contiguous CPU vectors of a1 values.
void check_eval(const Tensor& x, const std::vector<std::optional<Tensor>>& vecs, int64_t a0,
                int64_t a1, int64_t a2, int64_t channels_last, int64_t nchunks) {
  TORCH_CHECK(x.device().is_cpu() && x.layout() == at::kStrided && x_code(x) >= 0,
              "batchnorm native: a dense float16/32/64 CPU input, got ", x.toString());
  TORCH_CHECK(a0 > 0 && a1 > 0 && a2 >= 0 && x.numel() == a0 * a1 * (a2 == 0 ? 1 : a2) &&
                  x.dim() >= 2 && x.size(1) == a1 && nchunks > 0,
              "batchnorm native: view (", a0, ", ", a1, ", ", a2, ") (nchunks ", nchunks,
              ") does not fit an input of shape ", x.sizes());
  check_dense(x, channels_last, channels_last == 0 || a2 == 0);
  for (const std::optional<Tensor>& p : vecs) {
    if (!p.has_value() || !p->defined()) continue;
    const Tensor& t = *p;
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
                    t.dim() == 1 && t.size(0) == a1 && t.is_contiguous(),
                "batchnorm native: weight, bias and running statistics must be contiguous (",
                a1, ",) float32/float64 CPU tensors, got ", t.toString(), " of shape ",
                t.sizes());
  }
  TORCH_CHECK(vecs[2].has_value() && vecs[2]->defined() && vecs[3].has_value() &&
                  vecs[3]->defined(),
              "batchnorm native: evaluation needs the running mean and variance");
}

// (y, status): evaluation with the running statistics through the entry point of the
// arguments' dtypes. status 1: y served; 0: the running mean is too large for the plain
// form (the caller takes the general path, y unwritten); -1: no entry point registered for
// these dtypes (set_eval, then call again); 2: a lazily negated argument (the caller's
// Python route).
std::tuple<Tensor, int64_t> evaluate(const Tensor& x, const std::optional<Tensor>& w,
                                     const std::optional<Tensor>& b, const Tensor& rm,
                                     const Tensor& rv, int64_t a0, int64_t a1, int64_t a2,
                                     int64_t channels_last, double eps, int64_t nchunks) {
  std::vector<std::optional<Tensor>> vecs{w, b, rm, rv};
  check_eval(x, vecs, a0, a1, a2, channels_last, nchunks);
  if (lazy_bits({x, w, b, rm, rv})) return {Tensor(), 2};
  int64_t code = x_code(x) * 16;
  void* ptr[4];
  for (int j = 0; j < 4; ++j) {
    bool have = vecs[j].has_value() && vecs[j]->defined();
    code += (!have || vecs[j]->scalar_type() == at::kDouble ? 1 : 0) << (3 - j);
    ptr[j] = have ? vecs[j]->data_ptr() : filled64(a1, j == 0 ? 1.0 : 0.0);
  }
  Eval fn = EVAL[code];
  if (fn == nullptr) return {Tensor(), -1};
  Tensor y = bnpool::empty_like(x);
  void* coef = scratch(4 * a1);
  int32_t ok;
  {
    NoGil nogil;
    ok = fn(x.data_ptr(), ptr[0], ptr[1], ptr[2], ptr[3], eps, EVAL_LIMIT[code], coef,
            y.data_ptr(), a0, a1, a2, nchunks);
  }
  return {y, ok != 0 ? 1 : 0};
}

void set_eval(int64_t code, int64_t address, double limit) {
  TORCH_CHECK(code >= 0 && code < 48, "set_eval: a code in [0, 48), got ", code);
  EVAL[code] = reinterpret_cast<Eval>(address);
  EVAL_LIMIT[code] = limit;
}

void set_fallback(pybind11::object f) { FALLBACK = new pybind11::object(std::move(f)); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train", &train, "training forward through the native autograd node");
  m.def("set_kernels", &set_kernels, "register the C entry points of one dtype");
  m.def("evaluate", &evaluate, "evaluation with the running statistics (no autograd node)");
  m.def("set_eval", &set_eval, "register the evaluation entry point of one dtype combination");
  m.def("set_fallback", &set_fallback, "register the Python backward for the fallbacks");
  m.def("empty_pooled", &bnpool::empty_pooled, "a new tensor like x (pooled when large)");
  m.def("pool_stats", &bnpool::stats, "the output pool's counters");
  m.def("set_pool_limit", &bnpool::set_limit, "the output pool's byte limit (0: off)");
  m.def("empty_cache", [] { return static_cast<int64_t>(bnpool::trim(0)); },
        "free the output pool's cached blocks");
}
