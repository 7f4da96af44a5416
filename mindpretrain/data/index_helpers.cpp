// Dataset index builders for mindpretrain.data.index_builders.
//
// Both are sequential walks (the sample index over every document of every epoch, the blend over
// every output sample), which Python cannot run in seconds for billion-token corpora. The Python
// side validates inputs and decides the output dtype; this side still checks every array access and
// throws instead of reading out of bounds, because a cached index built from a wrong walk would
// silently train on the wrong tokens.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using Float64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Inputs of the sample-index walk, gathered so the templated walk can run without the GIL.
struct SampleWalk {
    const int32_t* sizes;
    int64_t num_documents;
    const int32_t* document_index;
    int64_t num_positions;
    int64_t seq_length;
    int64_t add_extra;
    int64_t num_samples;
    bool drop_last;

    // Token count of the document at `position` of the document index; throws rather than read
    // outside either array when the Python-side validation was bypassed.
    int64_t document_size(int64_t position) const {
        if (position < 0 || position >= num_positions) {
            throw std::out_of_range("document index position " + std::to_string(position) +
                                    " is outside the document index of length " +
                                    std::to_string(num_positions));
        }
        const int64_t document = document_index[position];
        if (document < 0 || document >= num_documents) {
            throw std::out_of_range("document id " + std::to_string(document) + " at position " +
                                    std::to_string(position) + " is outside sizes of length " +
                                    std::to_string(num_documents));
        }
        return sizes[document];
    }

    // Running out of documents is legitimate only for the final, partial sample that
    // drop_last=False keeps; anywhere else the token counts given to us were wrong.
    void check_tail(int64_t row) const {
        if (drop_last || row != num_samples) {
            throw std::invalid_argument("the document index ran out of tokens at sample " +
                                        std::to_string(row) + " of " + std::to_string(num_samples) +
                                        ": tokens_per_epoch overstates the documents' tokens");
        }
    }

    // Fills `out` (num_samples + 1 rows of (document index position, token offset)). Each row is
    // where a sample starts; sample i ends add_extra tokens past the start of row i + 1.
    template <typename T>
    void run(T* out) const {
        int64_t position = 0;
        int64_t offset = 0;
        out[0] = 0;
        out[1] = 0;
        for (int64_t row = 1; row <= num_samples; ++row) {
            int64_t remaining = seq_length + add_extra;
            while (remaining != 0) {
                const int64_t size = document_size(position);
                const int64_t available = size - offset;
                remaining -= available;
                if (remaining <= 0) {
                    offset += remaining + available - add_extra;
                    remaining = 0;
                } else if (position == num_positions - 1) {
                    check_tail(row);
                    offset = size - add_extra;
                    break;
                } else {
                    ++position;
                    offset = 0;
                }
            }
            out[2 * row] = static_cast<T>(position);
            out[2 * row + 1] = static_cast<T>(offset);
        }
    }
};

template <typename T>
py::array run_sample_walk(const SampleWalk& walk) {
    py::array_t<T> result({walk.num_samples + 1, static_cast<int64_t>(2)});
    T* out = result.mutable_data();
    {
        py::gil_scoped_release release;
        walk.run(out);
    }
    return result;
}

py::array build_sample_index(const Int32Array& sizes, const Int32Array& document_index,
                             int64_t seq_length, int64_t num_samples, bool drop_last,
                             int64_t add_extra, bool wide) {
    if (sizes.ndim() != 1 || document_index.ndim() != 1) {
        throw std::invalid_argument("sizes and document_index must be 1-D");
    }
    if (seq_length <= 0 || num_samples < 0 || add_extra < 0) {
        throw std::invalid_argument("need seq_length > 0, num_samples >= 0 and add_extra >= 0");
    }
    const SampleWalk walk{sizes.data(), sizes.shape(0), document_index.data(),
                          document_index.shape(0), seq_length, add_extra, num_samples, drop_last};
    return wide ? run_sample_walk<int64_t>(walk) : run_sample_walk<int32_t>(walk);
}

// Error-greedy choice over all samples: each goes to the dataset furthest below its share so far.
void blend(const double* weights, int64_t num_datasets, int64_t size, int16_t* dataset_index,
           int64_t* dataset_sample_index) {
    std::vector<int64_t> current(static_cast<size_t>(num_datasets), 0);
    for (int64_t i = 0; i < size; ++i) {
        const double x = i > 1 ? static_cast<double>(i) : 1.0;
        int64_t best = 0;
        double best_error = weights[0] * x - static_cast<double>(current[0]);
        for (int64_t d = 1; d < num_datasets; ++d) {
            const double error = weights[d] * x - static_cast<double>(current[d]);
            if (error > best_error) {
                best_error = error;
                best = d;
            }
        }
        dataset_index[i] = static_cast<int16_t>(best);
        dataset_sample_index[i] = current[best];
        ++current[best];
    }
}

py::tuple build_blending_indices(const Float64Array& weights, int64_t size) {
    if (weights.ndim() != 1) {
        throw std::invalid_argument("weights must be 1-D");
    }
    const int64_t num_datasets = weights.shape(0);
    if (num_datasets < 1 || num_datasets > std::numeric_limits<int16_t>::max()) {
        throw std::invalid_argument("need between 1 and 32767 datasets, got " +
                                    std::to_string(num_datasets));
    }
    if (size < 0) {
        throw std::invalid_argument("size must be >= 0");
    }
    py::array_t<int16_t> dataset_index(size);
    py::array_t<int64_t> dataset_sample_index(size);
    int16_t* index_out = dataset_index.mutable_data();
    int64_t* sample_out = dataset_sample_index.mutable_data();
    {
        py::gil_scoped_release release;
        blend(weights.data(), num_datasets, size, index_out, sample_out);
    }
    return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_index_helpers, m) {
    m.doc() = "C++ walks behind mindpretrain.data.index_builders; call that module, not this one.";
    m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("document_index"),
          py::arg("seq_length"), py::arg("num_samples"), py::arg("drop_last"),
          py::arg("add_extra"), py::arg("wide"),
          "(num_samples + 1, 2) rows of (document index position, offset); int64 if wide else int32.");
    m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
          "(int16 dataset index, int64 sample index within that dataset) for normalised weights.");
}
