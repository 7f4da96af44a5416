// Shared pieces of the project's CPU kernels (MindSpore custom "aot" ops, module `_cpu_kernels`): 8-lane float
// vectors in GCC vector types (SSE/AVX2/NEON alike), the vectorised exp, the thread split and the input checks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

// On x86-64 the row loops also get an AVX2 clone, chosen when the module loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROW_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define ROW_LOOP
#endif

// Exported although pybind11 builds with hidden visibility: MindSpore looks the kernels up by name in the module.
#define AOT_KERNEL extern "C" __attribute__((visibility("default"))) int

namespace cpu_kernels {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

// Threads the kernels split their work over (module.cpp: set_threads).
extern std::atomic<int> threads;

// oneDNN's row-major sgemm (C = alpha op(A) op(B) + beta C) from the libdnnl MindSpore ships, or null
// (module.cpp: set_sgemm_library); each call runs on one thread, the callers split the output over `threads`.
typedef int (*Sgemm)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float,
                     float*, int64_t);
extern std::atomic<Sgemm> sgemm;

inline f8 splat(float value) { return f8{value, value, value, value, value, value, value, value}; }
inline f8 load(const float* from) { f8 v; std::memcpy(&v, from, sizeof v); return v; }
inline void store(float* to, f8 v) { std::memcpy(to, &v, sizeof v); }

inline float lane_sum(f8 v) {
    float total = 0.0f;
    for (int lane = 0; lane < 8; ++lane) total += v[lane];
    return total;
}

// e^x for x <= 0 (arguments below -87 give e^-87, about 1.6e-38, instead of a denormal or 0): Cody-Waite
// reduction x = n ln2 + r, Cephes' degree-6 polynomial, 2^n from the exponent bits; relative error about 2e-7.
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

// How many workers split `count` items of `elements` total work: up to `threads`, none for less than 64 K.
inline int64_t workers_for(int64_t count, int64_t elements) {
    return std::max<int64_t>(1, std::min<int64_t>({threads.load(), count, elements / (1 << 16) + 1}));
}

// body(worker, begin, end) over `workers` consecutive ranges of [0, count), the first on the calling thread.
template <typename Body>
void over_workers(int64_t count, int64_t workers, const Body& body) {
    const int64_t chunk = (count + workers - 1) / workers;
    std::vector<std::thread> pool;
    for (int64_t worker = 1; worker * chunk < count; ++worker) {
        pool.emplace_back(body, worker, worker * chunk, std::min(count, (worker + 1) * chunk));
    }
    body(0, 0, std::min(count, chunk));
    for (auto& thread : pool) thread.join();
}

// body(begin, end) over ranges of [0, count), on up to `threads` threads (one when `elements`, the work, is small).
template <typename Body>
void over_ranges(int64_t count, int64_t elements, const Body& body) {
    over_workers(count, workers_for(count, elements),
                 [&](int64_t, int64_t begin, int64_t end) { body(begin, end); });
}

// Whether input `index` has rank `ndim` (any rank >= 1 when ndim is 0) and element type `dtype`.
inline bool is_tensor(int index, int ndim, const char* dtype, const int* ndims, const char** dtypes) {
    return (ndim == 0 ? ndims[index] >= 1 : ndims[index] == ndim) && std::string(dtypes[index]) == dtype;
}

}  // namespace cpu_kernels
