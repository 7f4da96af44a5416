// One fused, in-place AdamW step over float32 host buffers (the CPU host update of mindpretrain's AdamW).
//
// Why: on CPU a MindSpore parameter lives in host memory that NumPy can view without a copy, so the largest
// parameters can be updated there element by element with no temporary at all, instead of by kernels that take
// parameter-sized buffers from the memory pool (see optimizer.py). The formula is the bias-corrected AdamW of
// optimizer.py, in float32, in this order (the NumPy fallback in host_adamw.py performs the same operations):
//     g = grad * scale
//     m = beta1 * m + (1 - beta1) * g
//     v = beta2 * v + (1 - beta2) * g * g
//     p = p - lr_wd * p                      (matrices only)
//     p = p - lr * (m / bc1) / (sqrt(v / bc2) + eps)
// Built with -ffp-contract=off so no multiply-add is fused: the rounding is NumPy's, on every platform.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

struct Scalars {
    float scale, beta1, one_minus_beta1, beta2, one_minus_beta2, lr_wd, lr, bc1, bc2, eps;
    bool decay;
};

void update_range(float* p, float* m, float* v, const float* grad, const Scalars& s, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
        const float g = grad[i] * s.scale;
        const float m_new = s.beta1 * m[i] + s.one_minus_beta1 * g;
        const float v_new = s.beta2 * v[i] + s.one_minus_beta2 * g * g;
        float p_new = p[i];
        if (s.decay) {
            p_new = p_new - s.lr_wd * p_new;
        }
        const float denominator = std::sqrt(v_new / s.bc2) + s.eps;
        p_new = p_new - s.lr * (m_new / s.bc1) / denominator;
        m[i] = m_new;
        v[i] = v_new;
        p[i] = p_new;
    }
}

// The array's data when it is a C-contiguous float32 array of `size` elements (and writable when `write`).
float* checked(py::array& array, const char* what, int64_t size, bool write) {
    if (!py::isinstance<py::array_t<float>>(array) || !(array.flags() & py::array::c_style) ||
        (write && !array.writeable())) {
        throw std::invalid_argument(std::string(what) + " must be a " + (write ? "writable " : "") +
                                    "C-contiguous float32 array");
    }
    if (array.size() != size) {
        throw std::invalid_argument(std::string(what) + " has " + std::to_string(array.size()) +
                                    " elements, the parameter " + std::to_string(size));
    }
    return static_cast<float*>(write ? array.mutable_data() : const_cast<void*>(array.data()));
}

void adamw_step(py::array param, py::array exp_avg, py::array exp_avg_sq, py::array grad, float scale, float beta1,
                float beta2, float lr, float lr_wd, float bc1, float bc2, float eps, bool decay, int threads) {
    const int64_t size = param.size();
    float* p = checked(param, "param", size, true);
    float* m = checked(exp_avg, "exp_avg", size, true);
    float* v = checked(exp_avg_sq, "exp_avg_sq", size, true);
    const float* g = checked(grad, "grad", size, false);
    const Scalars s{scale, beta1, 1.0f - beta1, beta2, 1.0f - beta2, lr_wd, lr, bc1, bc2, eps, decay};
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, size / (1 << 16) + 1));
    py::gil_scoped_release release;
    if (workers == 1) {
        update_range(p, m, v, g, s, 0, size);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t chunk = (size + workers - 1) / workers;
    for (int64_t w = 0; w < workers; ++w) {
        const int64_t begin = w * chunk, end = std::min(size, begin + chunk);
        if (begin < end) {
            pool.emplace_back(update_range, p, m, v, g, std::cref(s), begin, end);
        }
    }
    for (auto& worker : pool) {
        worker.join();
    }
}

}  // namespace

PYBIND11_MODULE(_host_adamw, module) {
    module.doc() = "Fused in-place float32 AdamW step over host buffers (mindpretrain.training.host_adamw)";
    module.def("adamw_step", &adamw_step, py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
               py::arg("grad"), py::arg("scale"), py::arg("beta1"), py::arg("beta2"), py::arg("lr"),
               py::arg("lr_wd"), py::arg("bc1"), py::arg("bc2"), py::arg("eps"), py::arg("decay"),
               py::arg("threads"));
}
