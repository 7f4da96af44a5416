// The Python module `_cpu_kernels`: its settings (threads, the sgemm library). The kernels themselves
// (label_log_prob.cpp, rms_norm.cpp) are exported C functions that MindSpore's custom "aot" ops call by name.
#include <dlfcn.h>
#include <pybind11/pybind11.h>

#include "cpu_kernels.h"

namespace py = pybind11;

namespace cpu_kernels {
std::atomic<int> threads{1};
std::atomic<Sgemm> sgemm{nullptr};
}  // namespace cpu_kernels

PYBIND11_MODULE(_cpu_kernels, module) {
    module.doc() = "The project's CPU kernels for MindSpore custom aot ops (mindpretrain/kernels/)";
    module.def("set_threads", [](int count) { cpu_kernels::threads.store(std::max(1, count)); }, py::arg("threads"),
               "Threads the kernels split their work over (the run's kernel threads).");
    module.def(
        "set_sgemm_library",
        [](const std::string& path) {
            void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
            void* symbol = library == nullptr ? nullptr : dlsym(library, "dnnl_sgemm");
            cpu_kernels::sgemm.store(reinterpret_cast<cpu_kernels::Sgemm>(symbol));
            return symbol != nullptr;
        },
        py::arg("path"), "Load oneDNN's dnnl_sgemm from `path` for the head kernels; whether it was found.");
}
