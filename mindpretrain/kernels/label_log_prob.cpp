// log_softmax(logits)[label] of each row of float32 [rows, vocab] logits, and its gradient, as MindSpore custom
// "aot" CPU kernels (mindpretrain/kernels/label_log_prob.py) in the module `_cpu_kernels`: LabelLogProb* on
// given logits, HeadLabelLogProb* with the head's matmul (tokens @ weight^T) inside, through oneDNN's sgemm.
//
// Why: the output head's cross-entropy over [tokens, vocab] logits is the largest element-wise work of a step.
// MindSpore's CPU LogSoftmax + GatherD and their gradients make four passes over the logits with a scalar exp;
// here the forward makes one pass (row max, then the sum of exp: two reads) and keeps only the row's log-sum-exp,
// and the backward writes d logits = dout * (onehot(label) - exp(logits - lse)) in one pass. The exp is the
// vectorised one of cpu_kernels.h (all its arguments are x - max <= 0). Rows are split over threads; each
// row's sums run in a fixed order, so the label log-probs do not depend on the thread count (the head's
// matmuls are split over output ranges, each computed by one single-threaded sgemm call).
#include "cpu_kernels.h"

using namespace cpu_kernels;

namespace {

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
    float total = lane_sum(a + b);
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

// picked[r] = log_softmax(logits[r])[labels[r]] and lse[r] = logsumexp(logits[r]) for every row.
void label_log_probs(const float* logits, const int32_t* labels, int64_t rows, int64_t cols, float* picked,
                     float* lse) {
    over_ranges(rows, rows * cols, [=](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* x = logits + r * cols;
            const float top = row_max(x, cols);
            lse[r] = top + std::log(row_sum_exp(x, cols, top));
            picked[r] = x[labels[r]] - lse[r];
        }
    });
}

// dlogits = dout * (onehot(labels) - softmax(logits)), row by row.
void label_log_prob_grads(const float* logits, const int32_t* labels, const float* lse, const float* dout,
                          int64_t rows, int64_t cols, float* dlogits) {
    over_ranges(rows, rows * cols, [=](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            row_softmax_grad(logits + r * cols, dlogits + r * cols, cols, lse[r], dout[r]);
            dlogits[r * cols + labels[r]] += dout[r];
        }
    });
}

bool labels_in_range(const int32_t* labels, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r) {
        if (labels[r] < 0 || labels[r] >= cols) return false;
    }
    return true;
}

}  // namespace

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
    label_log_probs(logits, labels, rows, cols, picked, lse);
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
    label_log_prob_grads(logits, labels, lse, dout, rows, cols, dlogits);
    return 0;
}

// The head and its label log-prob in one op: inputs tokens float32 [R, H], weight float32 [V, H], labels int32
// [R]; outputs picked [R], lse [R] and the logits [R, V] = tokens @ weight^T (kept for the backward). The matmul
// goes through oneDNN's sgemm, split over vocabulary ranges. Returns 3 when no sgemm library was set.
AOT_KERNEL HeadLabelLogProbForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                   void* /*stream*/, void* /*extra*/) {
    const Sgemm gemm = sgemm.load();
    if (gemm == nullptr) return 3;
    if (nparam != 6 || !is_tensor(0, 2, "float32", ndims, dtypes) || !is_tensor(1, 2, "float32", ndims, dtypes) ||
        !is_tensor(2, 1, "int32", ndims, dtypes) || shapes[1][1] != shapes[0][1] || shapes[2][0] != shapes[0][0]) {
        return 1;
    }
    const float* tokens = static_cast<const float*>(params[0]);
    const float* weight = static_cast<const float*>(params[1]);
    const int32_t* labels = static_cast<const int32_t*>(params[2]);
    float* picked = static_cast<float*>(params[3]);
    float* lse = static_cast<float*>(params[4]);
    float* logits = static_cast<float*>(params[5]);
    const int64_t rows = shapes[0][0], hidden = shapes[0][1], vocab = shapes[1][0];
    if (!labels_in_range(labels, rows, vocab)) return 2;
    std::atomic<int> failed{0};
    over_ranges(vocab, rows * vocab, [&](int64_t begin, int64_t end) {       // logits[:, begin:end]
        failed |= gemm('N', 'T', rows, end - begin, hidden, 1.0f, tokens, hidden, weight + begin * hidden, hidden,
                        0.0f, logits + begin, vocab);
    });
    if (failed) return 4;
    label_log_probs(logits, labels, rows, vocab, picked, lse);
    return 0;
}

// Its backward: inputs tokens [R, H], weight [V, H], labels [R], logits [R, V], lse [R], dout float32 [R] (the
// gradient of `picked`); outputs d tokens [R, H] = dlogits @ weight and d weight [V, H] = dlogits^T @ tokens,
// where dlogits = dout * (onehot - softmax) lives in a buffer of this call only.
AOT_KERNEL HeadLabelLogProbBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                    void* /*stream*/, void* /*extra*/) {
    const Sgemm gemm = sgemm.load();
    if (gemm == nullptr) return 3;
    if (nparam != 8 || !is_tensor(0, 2, "float32", ndims, dtypes) || !is_tensor(1, 2, "float32", ndims, dtypes) ||
        !is_tensor(2, 1, "int32", ndims, dtypes) || !is_tensor(3, 2, "float32", ndims, dtypes) ||
        !is_tensor(4, 1, "float32", ndims, dtypes) || !is_tensor(5, 1, "float32", ndims, dtypes)) {
        return 1;
    }
    const float* tokens = static_cast<const float*>(params[0]);
    const float* weight = static_cast<const float*>(params[1]);
    const int32_t* labels = static_cast<const int32_t*>(params[2]);
    const float* logits = static_cast<const float*>(params[3]);
    const float* lse = static_cast<const float*>(params[4]);
    const float* dout = static_cast<const float*>(params[5]);
    float* dtokens = static_cast<float*>(params[6]);
    float* dweight = static_cast<float*>(params[7]);
    const int64_t rows = shapes[0][0], hidden = shapes[0][1], vocab = shapes[1][0];
    if (!labels_in_range(labels, rows, vocab)) return 2;
    std::unique_ptr<float[]> dlogits(new float[rows * vocab]);
    label_log_prob_grads(logits, labels, lse, dout, rows, vocab, dlogits.get());
    const float* grad = dlogits.get();
    std::atomic<int> failed{0};
    over_ranges(rows, rows * hidden * vocab, [&](int64_t begin, int64_t end) {   // d tokens[begin:end]
        failed |= gemm('N', 'N', end - begin, hidden, vocab, 1.0f, grad + begin * vocab, vocab, weight, hidden,
                        0.0f, dtokens + begin * hidden, hidden);
    });
    over_ranges(vocab, vocab * hidden * rows, [&](int64_t begin, int64_t end) {  // d weight[begin:end]
        failed |= gemm('T', 'N', end - begin, hidden, rows, 1.0f, grad + begin, vocab, tokens, hidden,
                        0.0f, dweight + begin * hidden, hidden);
    });
    return failed ? 4 : 0;
}
