// RMSNorm of float32 rows and its gradient as MindSpore custom "aot" CPU kernels (mindpretrain/kernels/rms_norm.py):
//     r = 1 / sqrt(sum(x^2) * (1 / H) + eps),  y = w * (x * r)
//     xhat = x * r,  g = dy * w,  dx = r * (g - xhat * (sum(g * xhat) * (1 / H))),  dw = sum over rows of dy * xhat
// Why: in compiled CPU graphs the norm is a dozen kernels (broadcasts, products, row sums through MatMuls, and
// their gradients; research/deepseek3/layers.py ExpandedRMSNormCore), each a pass over [rows, H]; here the
// forward is one pass and the backward one. Rows are split over threads; the weight gradient is the sum of the
// threads' partial sums in thread order (its rounding depends on the thread count, the rest does not).
#include "cpu_kernels.h"

using namespace cpu_kernels;

namespace {

ROW_LOOP float row_dot(const float* a, const float* b, int64_t n) {
    f8 even = splat(0.0f), odd = even;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        even += load(a + i) * load(b + i);
        odd += load(a + i + 8) * load(b + i + 8);
    }
    float total = lane_sum(even + odd);
    for (; i < n; ++i) total += a[i] * b[i];
    return total;
}

ROW_LOOP void norm_rows(const float* x, const float* w, float eps, int64_t begin, int64_t end, int64_t n, float* y,
                        float* factor) {
    for (int64_t row = begin; row < end; ++row) {
        const float* in = x + row * n;
        float* out = y + row * n;
        const float r = 1.0f / std::sqrt(row_dot(in, in, n) * (1.0f / n) + eps);
        factor[row] = r;
        for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (in[i] * r);
    }
}

// dx of rows [begin, end); dw_partial += dy * xhat over them (xhat is kept in `scratch`, n floats).
ROW_LOOP void norm_grad_rows(const float* x, const float* w, const float* factor, const float* dy, int64_t begin,
                             int64_t end, int64_t n, float* dx, float* dw_partial, float* scratch, float* scaled) {
    for (int64_t row = begin; row < end; ++row) {
        const float* in = x + row * n;
        const float* grad = dy + row * n;
        const float r = factor[row];
        for (int64_t i = 0; i < n; ++i) {
            scratch[i] = in[i] * r;
            scaled[i] = grad[i] * w[i];
            dw_partial[i] += grad[i] * scratch[i];
        }
        const float mean = row_dot(scaled, scratch, n) * (1.0f / n);
        float* out = dx + row * n;
        for (int64_t i = 0; i < n; ++i) out[i] = r * (scaled[i] - scratch[i] * mean);
    }
}

int64_t rows_of(int index, const int* ndims, int64_t** shapes) {
    int64_t rows = 1;
    for (int d = 0; d + 1 < ndims[index]; ++d) rows *= shapes[index][d];
    return rows;
}

}  // namespace

// Inputs x float32 [..., H], w float32 [H], eps float32 [1]; outputs y [..., H] and r float32 [...] (kept for
// the backward). Returns 1 on a wrong input (MindSpore raises).
AOT_KERNEL RmsNormForward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                          void* /*stream*/, void* /*extra*/) {
    if (nparam != 5 || !is_tensor(0, 0, "float32", ndims, dtypes) || !is_tensor(1, 1, "float32", ndims, dtypes) ||
        !is_tensor(2, 1, "float32", ndims, dtypes) || shapes[1][0] != shapes[0][ndims[0] - 1]) {
        return 1;
    }
    const float* x = static_cast<const float*>(params[0]);
    const float* w = static_cast<const float*>(params[1]);
    const float eps = *static_cast<const float*>(params[2]);
    float* y = static_cast<float*>(params[3]);
    float* factor = static_cast<float*>(params[4]);
    const int64_t rows = rows_of(0, ndims, shapes), n = shapes[1][0];
    over_ranges(rows, rows * n, [=](int64_t begin, int64_t end) { norm_rows(x, w, eps, begin, end, n, y, factor); });
    return 0;
}

// Inputs x [..., H], w [H], r [...], dy [..., H]; outputs dx [..., H] and dw [H].
AOT_KERNEL RmsNormBackward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                           void* /*stream*/, void* /*extra*/) {
    if (nparam != 6 || !is_tensor(0, 0, "float32", ndims, dtypes) || !is_tensor(1, 1, "float32", ndims, dtypes) ||
        !is_tensor(3, 0, "float32", ndims, dtypes) || shapes[1][0] != shapes[0][ndims[0] - 1]) {
        return 1;
    }
    const float* x = static_cast<const float*>(params[0]);
    const float* w = static_cast<const float*>(params[1]);
    const float* factor = static_cast<const float*>(params[2]);
    const float* dy = static_cast<const float*>(params[3]);
    float* dx = static_cast<float*>(params[4]);
    float* dw = static_cast<float*>(params[5]);
    const int64_t rows = rows_of(0, ndims, shapes), n = shapes[1][0];
    const int64_t workers = workers_for(rows, rows * n);
    std::vector<std::vector<float>> partial(workers, std::vector<float>(3 * n, 0.0f));   // dw, xhat, dy * w
    over_workers(rows, workers, [&](int64_t worker, int64_t begin, int64_t end) {
        float* own = partial[worker].data();
        norm_grad_rows(x, w, factor, dy, begin, end, n, dx, own, own + n, own + 2 * n);
    });
    for (int64_t i = 0; i < n; ++i) {
        float total = partial[0][i];
        for (int64_t worker = 1; worker < workers; ++worker) total += partial[worker][i];
        dw[i] = total;
    }
    return 0;
}
