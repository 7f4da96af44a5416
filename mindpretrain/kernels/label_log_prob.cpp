// log_softmax(logits)[label] of each row of float32 [rows, vocab] logits, and its gradient, as two MindSpore
// custom "aot" CPU kernels (mindpretrain/kernels/label_log_prob.py) in the module `_label_log_prob`.
//
// Why: the output head's cross-entropy over [tokens, vocab] logits is the largest element-wise work of a step.
// MindSpore's CPU LogSoftmax + GatherD and their gradients make four passes over the logits with a scalar exp;
// here the forward makes one pass (row max, then the sum of exp: two reads) and keeps only the row's log-sum-exp,
// and the backward writes d logits = dout * (onehot(label) - exp(logits - lse)) in one pass. The exp is a
// vectorised Cody-Waite reduction with Cephes' degree-6 polynomial (relative error about 2e-7 for x <= 0, the
// only arguments it gets), in GCC vector types so it compiles to SSE/AVX2/NEON alike; on x86-64 the row loops
// also get an AVX2 clone chosen at load. Rows are split over threads (set_threads); each row's sums run in a
// fixed order, so results do not depend on the thread count.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROW_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define ROW_LOOP
#endif

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

std::atomic<int> g_threads{1};

inline f8 splat(float value) { return f8{value, value, value, value, value, value, value, value}; }
inline f8 load(const float* from) { f8 v; std::memcpy(&v, from, sizeof v); return v; }
inline void store(float* to, f8 v) { std::memcpy(to, &v, sizeof v); }

// e^x for x <= 0 (arguments below -87 give e^-87, about 1.6e-38, instead of a denormal or 0).
inline f8 exp_nonpositive(f8 x) {
    x = x < splat(-87.0f) ? splat(-87.0f) : x;
    const f8 n = (x * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);   // round(x / ln2)
    const f8 r = (x - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);                   // x - n ln2
    f8 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;                                  // 2^n
    f8 scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

inline float exp_nonpositive(float x) {
    float lanes[8] = {x};
    store(lanes, exp_nonpositive(load(lanes)));
    return lanes[0];
}

ROW_LOOP float row_max(const float* x, int64_t n) {
    f8 a = splat(-INFINITY), b = a;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const f8 u = load(x + i), w = load(x + i + 8);
        a = u > a ? u : a;
        b = w > b ? w : b;
    }
    a = b > a ? b : a;
    float best = -INFINITY;
    for (int lane = 0; lane < 8; ++lane) best = std::max(best, a[lane]);
    for (; i < n; ++i) best = std::max(best, x[i]);
    return best;
}

ROW_LOOP float row_sum_exp(const float* x, int64_t n, float shift) {
    const f8 s = splat(shift);
    f8 a = splat(0.0f), b = a;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a += exp_nonpositive(load(x + i) - s);
        b += exp_nonpositive(load(x + i + 8) - s);
    }
    a += b;
    float total = 0.0f;
    for (int lane = 0; lane < 8; ++lane) total += a[lane];
    for (; i < n; ++i) total += exp_nonpositive(x[i] - shift);
    return total;
}

// dx = -g * exp(x - lse) (the label's +g is added by the caller).
ROW_LOOP void row_softmax_grad(const float* x, float* dx, int64_t n, float lse, float g) {
    const f8 l = splat(lse), minus_g = splat(-g);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store(dx + i, minus_g * exp_nonpositive(load(x + i) - l));
    for (; i < n; ++i) dx[i] = -g * exp_nonpositive(x[i] - lse);
}

// body(begin, end) over row ranges, on up to g_threads threads (one when the work is small).
template <typename Body>
void over_rows(int64_t rows, int64_t cols, const Body& body) {
    const int64_t enough = rows * cols / (1 << 16) + 1;       // no thread for less than 64 K elements
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>({g_threads.load(), rows, enough}));
    if (workers == 1) {
        body(0, rows);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t chunk = (rows + workers - 1) / workers;
    for (int64_t begin = chunk; begin < rows; begin += chunk) {
        pool.emplace_back(body, begin, std::min(rows, begin + chunk));
    }
    body(0, std::min(rows, chunk));
    for (auto& worker : pool) worker.join();
}

// Whether input `index` has rank `ndim` and element type `dtype`.
bool is_tensor(int index, int ndim, const char* dtype, int* ndims, const char** dtypes) {
    return ndims[index] == ndim && std::string(dtypes[index]) == dtype;
}

bool labels_in_range(const int32_t* labels, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r) {
        if (labels[r] < 0 || labels[r] >= cols) return false;
    }
    return true;
}

}  // namespace

// Exported although pybind11 builds with hidden visibility: MindSpore looks the kernels up by name in this file.
#define AOT_KERNEL extern "C" __attribute__((visibility("default"))) int

// Inputs logits float32 [R, V], labels int32 [R]; outputs picked float32 [R] (log_softmax(logits)[label]) and
// lse float32 [R] (the row's log-sum-exp, for the backward). Returns 1 on a wrong input (MindSpore raises).
AOT_KERNEL LabelLogProbForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                               void* /*stream*/, void* /*extra*/) {
    if (nparam != 4 || !is_tensor(0, 2, "float32", ndims, dtypes) || !is_tensor(1, 1, "int32", ndims, dtypes) ||
        shapes[1][0] != shapes[0][0]) {
        return 1;
    }
    const float* logits = static_cast<const float*>(params[0]);
    const int32_t* labels = static_cast<const int32_t*>(params[1]);
    float* picked = static_cast<float*>(params[2]);
    float* lse = static_cast<float*>(params[3]);
    const int64_t rows = shapes[0][0], cols = shapes[0][1];
    if (!labels_in_range(labels, rows, cols)) return 2;
    over_rows(rows, cols, [=](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* x = logits + r * cols;
            const float top = row_max(x, cols);
            lse[r] = top + std::log(row_sum_exp(x, cols, top));
            picked[r] = x[labels[r]] - lse[r];
        }
    });
    return 0;
}

// Inputs logits [R, V], labels [R], lse [R], dout float32 [R] (the gradient of `picked`); output d logits
// float32 [R, V] = dout * (onehot(label) - softmax(logits)).
AOT_KERNEL LabelLogProbBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                void* /*stream*/, void* /*extra*/) {
    if (nparam != 5 || !is_tensor(0, 2, "float32", ndims, dtypes) || !is_tensor(1, 1, "int32", ndims, dtypes) ||
        !is_tensor(2, 1, "float32", ndims, dtypes) || !is_tensor(3, 1, "float32", ndims, dtypes)) {
        return 1;
    }
    const float* logits = static_cast<const float*>(params[0]);
    const int32_t* labels = static_cast<const int32_t*>(params[1]);
    const float* lse = static_cast<const float*>(params[2]);
    const float* dout = static_cast<const float*>(params[3]);
    float* dlogits = static_cast<float*>(params[4]);
    const int64_t rows = shapes[0][0], cols = shapes[0][1];
    if (!labels_in_range(labels, rows, cols)) return 2;
    over_rows(rows, cols, [=](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            row_softmax_grad(logits + r * cols, dlogits + r * cols, cols, lse[r], dout[r]);
            dlogits[r * cols + labels[r]] += dout[r];
        }
    });
    return 0;
}

PYBIND11_MODULE(_label_log_prob, module) {
    module.doc() = "Fused log_softmax-at-label CPU kernels for MindSpore custom aot ops (label_log_prob.py)";
    module.def("set_threads", [](int threads) { g_threads.store(std::max(1, threads)); }, py::arg("threads"),
               "Threads the kernels split rows over (the run's kernel threads).");
}
