// pybind11 face of the packer: numpy arrays in, numpy arrays or filled buffers out. Every array
// argument is `noconvert`, so a wrong dtype or a non-contiguous array is a TypeError rather than a
// silent copy (of a multi-gigabyte memory map, or of an output buffer we would then fill in vain).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "packer.h"

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(what);
}

template <typename T>
void require_1d(const CArray<T>& a, const char* name) {
    require(a.ndim() == 1, std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + " dimensions");
}

py::array_t<int64_t> plan_bins_py(const CArray<int64_t>& lengths, int64_t seq_len, int64_t window) {
    require_1d(lengths, "lengths");
    const int64_t n = lengths.shape(0);
    py::array_t<int64_t> bin_of(n);
    const int64_t* in = lengths.data();
    int64_t* out = bin_of.mutable_data();
    {
        py::gil_scoped_release release;
        rega::plan_bins(in, n, seq_len, window, out);
    }
    return bin_of;
}

py::array_t<int64_t> deal_rows_py(const CArray<int64_t>& row_tokens, int64_t world_size, int64_t batch_size) {
    require_1d(row_tokens, "row_tokens");
    const int64_t n = row_tokens.shape(0);
    const int64_t num_global = rega::num_global_batches(n, world_size, batch_size);
    py::array_t<int64_t> out({num_global, world_size, batch_size});
    const int64_t* in = row_tokens.data();
    int64_t* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        rega::deal_rows(in, n, world_size, batch_size, dst);
    }
    return out;
}

// Holds references to the dataset's arrays (memory maps included) for as long as batches are made
// from them, and checks once that they describe a consistent dataset. A dataset is one or more
// shards; sample ids run over them in order.
class PyTokenStore {
public:
    struct ShardArrays {
        CArray<int32_t> tokens;
        CArray<uint8_t> loss_mask;
        CArray<int64_t> offsets;
        CArray<uint8_t> kinds;
        CArray<int16_t> domains;
    };

    PyTokenStore(CArray<int32_t> tokens, CArray<uint8_t> loss_mask, CArray<int64_t> offsets, CArray<uint8_t> kinds,
                 CArray<int16_t> domains, CArray<float> kind_weights)
        : PyTokenStore(std::vector<ShardArrays>{{std::move(tokens), std::move(loss_mask), std::move(offsets),
                                                 std::move(kinds), std::move(domains)}},
                       std::move(kind_weights)) {}

    PyTokenStore(std::vector<ShardArrays> shards, CArray<float> kind_weights)
        : arrays_(std::move(shards)), kind_weights_(std::move(kind_weights)) {
        require_1d(kind_weights_, "kind_weights");
        view_.kind_weights = kind_weights_.data();
        view_.num_kinds = kind_weights_.shape(0);
        view_.sample_base.push_back(0);
        for (size_t k = 0; k < arrays_.size(); ++k) {
            ShardArrays& a = arrays_[k];
            const std::string where = arrays_.size() == 1 ? "" : "shard " + std::to_string(k) + ": ";
            require_1d(a.tokens, "tokens");
            require_1d(a.loss_mask, "loss_mask");
            require_1d(a.offsets, "offsets");
            require_1d(a.kinds, "kinds");
            require_1d(a.domains, "domains");
            require(a.loss_mask.shape(0) == a.tokens.shape(0),
                    where + "loss_mask has " + std::to_string(a.loss_mask.shape(0)) + " entries but tokens has " +
                        std::to_string(a.tokens.shape(0)));
            require(a.offsets.shape(0) >= 1, where + "offsets must hold num_samples + 1 entries");
            const int64_t num_samples = a.offsets.shape(0) - 1;
            require(a.kinds.shape(0) == num_samples && a.domains.shape(0) == num_samples,
                    where + "kinds and domains must hold one entry per sample (" + std::to_string(num_samples) + ")");
            view_.shards.push_back(rega::TokenShard{a.tokens.data(), a.loss_mask.data(), a.tokens.shape(0),
                                                    a.offsets.data(), a.kinds.data(), a.domains.data(),
                                                    num_samples});
            view_.sample_base.push_back(view_.sample_base.back() + num_samples);
        }
        view_.num_samples = view_.sample_base.back();
        py::gil_scoped_release release;
        for (size_t k = 0; k < view_.shards.size(); ++k) {
            const rega::TokenShard& shard = view_.shards[k];
            const std::string where = view_.shards.size() == 1 ? "" : "shard " + std::to_string(k) + ": ";
            const int64_t* off = shard.offsets;
            if (off[0] < 0) throw std::invalid_argument(where + "offsets[0] is negative");
            for (int64_t i = 0; i < shard.num_samples; ++i) {
                if (off[i + 1] < off[i]) {
                    throw std::invalid_argument(where + "offsets decrease at sample " + std::to_string(i));
                }
                if (shard.kinds[i] >= view_.num_kinds) {
                    throw std::invalid_argument(where + "sample " + std::to_string(i) + " has kind id " +
                                                std::to_string(shard.kinds[i]) + " but only " +
                                                std::to_string(view_.num_kinds) + " kind weights were given");
                }
            }
            if (off[shard.num_samples] > shard.num_tokens) {
                throw std::invalid_argument(where + "offsets end at " + std::to_string(off[shard.num_samples]) +
                                            " but tokens has only " + std::to_string(shard.num_tokens) + " entries");
            }
        }
    }

    static PyTokenStore from_shards(const py::list& shards, CArray<float> kind_weights) {
        std::vector<ShardArrays> arrays;
        for (const py::handle item : shards) {
            const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
            require(t.size() == 5, "each shard is (tokens, loss_mask, offsets, kinds, domains)");
            // cast<> of array_t converts; insist on the exact dtypes as noconvert does.
            auto exact = [&](size_t i, const py::dtype& dtype, const char* name) {
                const py::array a = py::reinterpret_borrow<py::array>(t[i]);
                if (!py::isinstance<py::array>(t[i]) || !a.dtype().is(dtype) ||
                    !(a.flags() & py::array::c_style)) {
                    throw py::type_error(std::string("from_shards: ") + name + " must be a C-contiguous " +
                                         std::string(py::str(dtype)) + " array");
                }
            };
            exact(0, py::dtype::of<int32_t>(), "tokens");
            exact(1, py::dtype::of<uint8_t>(), "loss_mask");
            exact(2, py::dtype::of<int64_t>(), "offsets");
            exact(3, py::dtype::of<uint8_t>(), "kinds");
            exact(4, py::dtype::of<int16_t>(), "domains");
            arrays.push_back({t[0].cast<CArray<int32_t>>(), t[1].cast<CArray<uint8_t>>(), t[2].cast<CArray<int64_t>>(),
                              t[3].cast<CArray<uint8_t>>(), t[4].cast<CArray<int16_t>>()});
        }
        return PyTokenStore(std::move(arrays), std::move(kind_weights));
    }

    int64_t num_samples() const { return view_.num_samples; }

    std::tuple<int64_t, int64_t, int64_t> fill_batch(const CArray<int64_t>& bin_splits, const CArray<int64_t>& bin_samples,
                                                     const CArray<int64_t>& rows, int32_t pad_id, CArray<int64_t> input_ids,
                                                     CArray<int64_t> labels, CArray<int64_t> position_ids,
                                                     CArray<int64_t> kind_ids, CArray<int64_t> domain_ids,
                                                     CArray<float> loss_weights, CArray<int32_t> cu_seqlens) const {
        const rega::BatchPlan plan = make_plan(bin_splits, bin_samples, rows);
        require(input_ids.ndim() == 2 && input_ids.shape(0) == plan.num_rows,
                "input_ids must be (len(rows), seq_len) = (" + std::to_string(plan.num_rows) + ", L)");
        const int64_t L = input_ids.shape(1);
        auto check_like = [&](const py::array& a, const char* name) {
            require(a.ndim() == 2 && a.shape(0) == plan.num_rows && a.shape(1) == L,
                    std::string(name) + " must have the shape of input_ids");
        };
        check_like(labels, "labels");
        check_like(position_ids, "position_ids");
        check_like(kind_ids, "kind_ids");
        check_like(domain_ids, "domain_ids");
        check_like(loss_weights, "loss_weights");
        require_1d(cu_seqlens, "cu_seqlens");
        // mutable_data() raises if a buffer is read-only.
        const rega::BatchOut out{input_ids.mutable_data(), labels.mutable_data(),    position_ids.mutable_data(),
                                 kind_ids.mutable_data(),  domain_ids.mutable_data(), loss_weights.mutable_data(),
                                 cu_seqlens.mutable_data(), cu_seqlens.shape(0),      L};
        rega::BatchStats stats;
        {
            py::gil_scoped_release release;
            stats = rega::fill_batch(view_, plan, pad_id, out);
        }
        return {stats.num_segments, stats.max_seqlen, stats.num_real_tokens};
    }

private:
    static rega::BatchPlan make_plan(const CArray<int64_t>& bin_splits, const CArray<int64_t>& bin_samples,
                                     const CArray<int64_t>& rows) {
        require_1d(bin_splits, "bin_splits");
        require_1d(bin_samples, "bin_samples");
        require_1d(rows, "rows");
        require(bin_splits.shape(0) >= 1, "bin_splits must hold num_bins + 1 entries");
        return rega::BatchPlan{bin_splits.data(), bin_samples.data(), bin_splits.shape(0) - 1,
                               bin_samples.shape(0), rows.data(),        rows.shape(0)};
    }

    std::vector<ShardArrays> arrays_;
    CArray<float> kind_weights_;
    rega::TokenStore view_{};
};

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "rega-engine C++ core: bin planning, rank dealing and batch materialisation for packed sequences";

    m.attr("IGNORE_INDEX") = rega::kIgnoreIndex;
    m.def("plan_bins", &plan_bins_py, py::arg("lengths").noconvert(), py::arg("seq_len"), py::arg("window"),
          "Windowed best-fit-decreasing: int64 bin id per sample, -1 when longer than seq_len.");
    m.def("deal_rows", &deal_rows_py, py::arg("row_tokens").noconvert(), py::arg("world_size"),
          py::arg("batch_size"),
          "Token-balanced dealing of rows to ranks: (num_global, world_size, batch_size) row indices, -1 = empty row.");

    py::class_<PyTokenStore>(m, "TokenStore")
        .def(py::init<CArray<int32_t>, CArray<uint8_t>, CArray<int64_t>, CArray<uint8_t>, CArray<int16_t>,
                      CArray<float>>(),
             py::arg("tokens").noconvert(), py::arg("loss_mask").noconvert(), py::arg("offsets").noconvert(),
             py::arg("kinds").noconvert(), py::arg("domains").noconvert(), py::arg("kind_weights").noconvert())
        .def_static("from_shards", &PyTokenStore::from_shards, py::arg("shards"), py::arg("kind_weights").noconvert(),
                    "A store over several shards, [(tokens, loss_mask, offsets, kinds, domains), ...]; sample ids "
                    "run over the shards in order.")
        .def_property_readonly("num_samples", &PyTokenStore::num_samples)
        .def("fill_batch", &PyTokenStore::fill_batch, py::arg("bin_splits").noconvert(),
             py::arg("bin_samples").noconvert(), py::arg("rows").noconvert(), py::arg("pad_id"),
             py::arg("input_ids").noconvert(), py::arg("labels").noconvert(), py::arg("position_ids").noconvert(),
             py::arg("kind_ids").noconvert(), py::arg("domain_ids").noconvert(), py::arg("loss_weights").noconvert(),
             py::arg("cu_seqlens").noconvert(),
             "Fills preallocated (B, L) buffers and cu_seqlens; returns (num_segments, max_seqlen, num_real_tokens).");
}
