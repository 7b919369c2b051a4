// pybind11 bindings for the bitnet engine: the only file that includes pybind11.
// std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError (pybind11 defaults).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "cpu/bandwidth.h"
#include "cpu/kernels.h"
#include "cpu/matmul.h"
#include "cpu/parallel.h"
#include "engine.h"
#ifdef BITNET_WITH_CUDA
#include "cuda/engine_cuda.h"
#endif

#ifndef BITNET_VERSION
#define BITNET_VERSION "0.0.0"
#endif

namespace py = pybind11;
using namespace bitnet;

namespace {

DType parse_dtype(const std::string& tag) {
  if (tag == "f32") return DType::F32;
  if (tag == "f16") return DType::F16;
  if (tag == "bf16") return DType::BF16;
  if (tag == "u8") return DType::U8;
  throw std::invalid_argument("unknown dtype tag '" + tag + "'; expected f32, f16, bf16 or u8");
}

// A C-contiguous numpy array whose item size matches the dtype tag, as a borrowed TensorRef.
TensorRef tensor_ref(const std::string& name, const py::array& a, DType dt) {
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument("tensor '" + name + "' is not C-contiguous");
  if (a.itemsize() != dtype_size(dt))
    throw std::invalid_argument("tensor '" + name + "' has item size " + std::to_string(a.itemsize()) +
                                " bytes; dtype " + dtype_name(dt) + " needs " + std::to_string(dtype_size(dt)));
  TensorRef r;
  r.dtype = dt;
  r.data = a.data();
  for (py::ssize_t i = 0; i < a.ndim(); ++i) r.shape.push_back(a.shape(i));
  return r;
}

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// The C++ model plus the Python arrays it borrows from (kept alive as long as the model).
struct PyModel {
  std::vector<py::object> keep_alive;
  std::unique_ptr<Model> model;
};

using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// (seq_ids, token arrays) -> a ragged Batch over `flat` (which must outlive it).
Batch make_batch(const std::vector<int64_t>& seq_ids, const std::vector<I32Array>& tokens, std::vector<int32_t>& flat) {
  if (tokens.size() != seq_ids.size())
    throw std::invalid_argument("forward: " + std::to_string(seq_ids.size()) + " sequence slots but " +
                                std::to_string(tokens.size()) + " token arrays");
  Batch b;
  b.seq_ids = seq_ids;
  b.offsets.push_back(0);
  for (const auto& t : tokens) {
    if (t.ndim() != 1) throw std::invalid_argument("forward: each token array must be 1-D");
    b.offsets.push_back(b.offsets.back() + t.shape(0));
  }
  flat.resize(static_cast<size_t>(b.offsets.back()));
  for (size_t i = 0; i < tokens.size(); ++i) std::copy_n(tokens[i].data(), tokens[i].shape(0), flat.data() + b.offsets[i]);
  b.tokens = flat.data();
  return b;
}

// Model.forward for either engine (PyModel + KVCache, PyCudaModel + DeviceKVCache): check the batch
// with the GIL held, then run it without the GIL into a fresh (rows, vocab) logits array.
template <class PyM, class Cache>
py::array_t<float> forward_logits(const PyM& p, Cache& cache, const std::vector<int64_t>& seq_ids,
                                  const std::vector<I32Array>& tokens, bool all_logits) {
  std::vector<int32_t> flat;
  const Batch b = make_batch(seq_ids, tokens, flat);
  p.model->check_batch(cache, b);
  const int64_t rows = p.model->logits_rows(b, all_logits);
  py::array_t<float> logits({rows, p.model->config().vocab_size});
  float* out = logits.mutable_data();
  {
    py::gil_scoped_release nogil;
    p.model->forward(cache, b, all_logits, out);
  }
  return logits;
}

#ifdef BITNET_WITH_CUDA
// The CUDA model plus the Python arrays it was loaded from (the device holds copies; kept for
// symmetry with PyModel and so that the host arrays outlive the upload).
struct PyCudaModel {
  std::vector<py::object> keep_alive;
  std::unique_ptr<cuda::DeviceModel> model;
};

#endif

std::string norm_name(NormKind n) {
  return n == NormKind::SubLN ? "subln" : n == NormKind::BitLinear ? "bitlinear" : "none";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bitnet_train C++ engine (CPU): i2_b128 / t3_b160 ternary kernels and a Llama-style forward with a KV cache";
  m.def("version", [] { return std::string(BITNET_VERSION); }, "Engine version string.");
  m.def("available_isas", &available_isas, "ISAs compiled in and supported by this CPU, best last.");
  m.def("openmp", &have_openmp, "Whether the engine was built with OpenMP.");
  m.def("prefetch_bytes", [] { return g_prefetch_bytes.load(); },
        "The software prefetch distance in use (8192, or BITNET_PREFETCH_BYTES as of the last engine load).");
  m.def("default_threads", &max_threads, "OpenMP's default thread count (1 without OpenMP).");
  m.def("resolve_isa", [](const std::string& isa) { return std::string(select_kernels(isa).name); }, py::arg("isa") = "",
        "The ISA a request resolves to ('' or 'auto': BITNET_ISA, else the best).");

  m.def(
      "fp16_bits",
      [](F32Array x) {
        py::array_t<uint16_t> out(x.request().shape);
        to_fp16_scalar(x.data(), static_cast<int64_t>(x.size()), out.mutable_data());
        return out;
      },
      py::arg("x"), "fp32 -> fp16 bit patterns as the f16 KV cache stores them (round to nearest even).");

  m.def(
      "quantize_rows",
      [](F32Array x, float eps, const std::string& isa) {
        if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D (rows, n)");
        const KernelTable& kt = select_kernels(isa);
        const int64_t rows = x.shape(0), n = x.shape(1);
        const int64_t n_pad = i2_blocks_per_row(n) * kI2BlockCodes;
        py::array_t<int8_t> q({rows, n_pad});
        py::array_t<float> s({rows});
        py::array_t<int32_t> sum({rows});
        {
          py::gil_scoped_release nogil;
          kt.quantize_rows(x.data(), rows, n, n, eps, q.mutable_data(), n_pad, s.mutable_data(), sum.mutable_data());
        }
        return py::make_tuple(q, s, sum);
      },
      py::arg("x"), py::arg("eps") = 1e-5f, py::arg("isa") = "",
      "Per-row int8 quantization -> (codes (rows, n padded to 128), s_x (rows,), code sums (rows,)).");

  m.def(
      "ternary_matmul",
      [](py::array qweight, float s_w, F32Array x, float eps, const std::string& isa, int threads,
         const std::string& packing_name) {
        if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D (rows, in_features)");
        const Packing packing = parse_packing(packing_name);
        const int64_t rows = x.shape(0), in = x.shape(1);
        const TensorRef w = tensor_ref("qweight", qweight, DType::U8);
        const int64_t row_bytes = packing_row_bytes(packing, in);
        if (w.shape.size() != 2 || w.shape[1] != row_bytes)
          throw std::invalid_argument("qweight has the wrong shape for " + packing_name + " and in_features " +
                                      std::to_string(in) + "; expected (out, " + std::to_string(row_bytes) + ")");
        if (threads < 1) throw std::invalid_argument("threads must be >= 1");
        const KernelTable& kt = select_kernels(isa);
        const int64_t out = w.shape[0];
        py::array_t<float> y({rows, out});
        {
          py::gil_scoped_release nogil;
          QuantBuffer qb;
          qb.resize(rows, in);
          kt.quantize_rows(x.data(), rows, in, in, eps, qb.q(), qb.stride(), qb.scale(), qb.sum());
          ternary_matmul(kt, packing, static_cast<const uint8_t*>(w.data), out, in, qb.view(), s_w, y.mutable_data(),
                         threads);
        }
        return y;
      },
      py::arg("qweight"), py::arg("s_w"), py::arg("x"), py::arg("eps") = 1e-5f, py::arg("isa") = "",
      py::arg("threads") = 1, py::arg("packing") = "i2_b128",
      "y (rows, out) = BitLinear(x) for ternary codes packed as `packing` (i2_b128 or t3_b160) and scale s_w "
      "(quantizes x per row).");

  m.def(
      "dense_matmul",
      [](py::array w, const std::string& dtype, F32Array x, const std::string& isa, int threads) {
        if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D (rows, in_features)");
        const DType dt = parse_dtype(dtype);
        if (dt == DType::U8) throw std::invalid_argument("dense_matmul needs f32, f16 or bf16 weights");
        const TensorRef wr = tensor_ref("w", w, dt);
        const int64_t rows = x.shape(0), in = x.shape(1);
        if (wr.shape.size() != 2 || wr.shape[1] != in)
          throw std::invalid_argument("w must be (out, " + std::to_string(in) + ")");
        if (threads < 1) throw std::invalid_argument("threads must be >= 1");
        const KernelTable& kt = select_kernels(isa);
        py::array_t<float> y({rows, wr.shape[0]});
        {
          py::gil_scoped_release nogil;
          dense_matmul(kt, wr.data, dt, wr.shape[0], in, x.data(), rows, y.mutable_data(), threads);
        }
        return y;
      },
      py::arg("w"), py::arg("dtype"), py::arg("x"), py::arg("isa") = "", py::arg("threads") = 1,
      "y (rows, out) = x @ w.T for a dense f32/f16/bf16 matrix (f16/bf16 given as uint16 bits).");

  m.def(
      "stream_read",
      [](int64_t mib, int threads, const std::string& isa, int repeats) {
        if (mib < 1) throw std::invalid_argument("stream_read: mib must be >= 1");
        if (threads < 1) throw std::invalid_argument("stream_read: threads must be >= 1");
        const std::string name = select_kernels(isa).name;  // validates the ISA ("" = the best)
        const int64_t bytes = mib << 20;
        uint64_t checksum = 0;
        double seconds;
        {
          py::gil_scoped_release nogil;
          std::unique_ptr<uint8_t, void (*)(void*)> buf(static_cast<uint8_t*>(std::aligned_alloc(64, bytes)), std::free);
          if (!buf) throw std::bad_alloc();
          // touch every page from the threads that will read it (first touch places the pages)
          const int64_t share = bytes / threads;
          parallel_for(threads, threads, [&](int64_t t) {
            std::memset(buf.get() + t * share, static_cast<int>(t + 1), static_cast<size_t>(t + 1 == threads ? bytes - t * share : share));
          });
          seconds = stream_read_seconds(buf.get(), bytes, threads, name, repeats, &checksum);
        }
        return py::make_tuple(static_cast<double>(bytes) / seconds / 1e9, checksum);
      },
      py::arg("mib") = 1024, py::arg("threads") = 1, py::arg("isa") = "", py::arg("repeats") = 5,
      "Streaming-read bandwidth: (GB/s of the best of `repeats` passes over a `mib` MiB buffer, every thread "
      "reading its share with the ISA's widest loads; a checksum of the bytes read).");

  py::class_<ModelConfig>(m, "ModelConfig")
      .def(py::init<>())
      .def_readwrite("vocab_size", &ModelConfig::vocab_size)
      .def_readwrite("hidden_size", &ModelConfig::hidden_size)
      .def_readwrite("intermediate_size", &ModelConfig::intermediate_size)
      .def_readwrite("num_layers", &ModelConfig::num_layers)
      .def_readwrite("num_heads", &ModelConfig::num_heads)
      .def_readwrite("num_kv_heads", &ModelConfig::num_kv_heads)
      .def_readwrite("head_dim", &ModelConfig::head_dim)
      .def_readwrite("max_seq_len", &ModelConfig::max_seq_len)
      .def_readwrite("rope_theta", &ModelConfig::rope_theta)
      .def_readwrite("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_readwrite("act_eps", &ModelConfig::act_eps)
      .def_readwrite("tie_embeddings", &ModelConfig::tie_embeddings)
      .def_readwrite("qkv_bias", &ModelConfig::qkv_bias)
      .def_readwrite("qk_norm", &ModelConfig::qk_norm)
      .def_property(
          "packing", [](const ModelConfig& c) { return std::string(packing_name(c.packing)); },
          [](ModelConfig& c, const std::string& s) { c.packing = parse_packing(s); },
          "Layout of the ternary `.qweight` tensors, read in place: 'i2_b128' or 't3_b160'.")
      .def_property(
          "norm", [](const ModelConfig& c) { return norm_name(c.norm); },
          [](ModelConfig& c, const std::string& s) {
            if (s == "subln") c.norm = NormKind::SubLN;
            else if (s == "bitlinear") c.norm = NormKind::BitLinear;
            else if (s == "none") c.norm = NormKind::None;
            else throw std::invalid_argument("norm must be 'subln', 'bitlinear' or 'none', got '" + s + "'");
          })
      .def_property(
          "ffn", [](const ModelConfig& c) { return std::string(c.ffn == FfnKind::SwiGLU ? "swiglu" : "relu2"); },
          [](ModelConfig& c, const std::string& s) {
            if (s == "swiglu") c.ffn = FfnKind::SwiGLU;
            else if (s == "relu2") c.ffn = FfnKind::ReLU2;
            else throw std::invalid_argument("ffn must be 'swiglu' or 'relu2', got '" + s + "'");
          })
      .def("validate", &ModelConfig::validate);

  py::class_<KVCache>(m, "KVCache")
      .def_property_readonly("n_seqs", &KVCache::n_seqs)
      .def_property_readonly("max_len", &KVCache::max_len)
      .def_property_readonly("nbytes", &KVCache::bytes)
      .def_property_readonly("dtype", [](const KVCache& c) { return std::string(kv_type_name(c.type())); })
      .def("length", &KVCache::length, py::arg("seq"))
      .def("reset", &KVCache::reset, py::arg("seq") = -1, "Forget a sequence's tokens (seq < 0: all).")
      .def("truncate", &KVCache::truncate, py::arg("seq"), py::arg("length"),
           "Keep only the first `length` tokens of a sequence (prefix reuse).");

  py::class_<PyModel>(m, "Model")
      .def(py::init([](const ModelConfig& cfg, const std::vector<std::tuple<std::string, py::array, std::string>>& tensors,
                       const std::string& isa) {
             auto pm = std::make_unique<PyModel>();
             TensorMap map;
             for (const auto& [name, arr, tag] : tensors) {
               if (map.count(name)) throw std::invalid_argument("tensor '" + name + "' given twice");
               map[name] = tensor_ref(name, arr, parse_dtype(tag));
               pm->keep_alive.push_back(arr);
             }
             pm->model = std::make_unique<Model>(cfg, map, isa);
             return pm;
           }),
           py::arg("config"), py::arg("tensors"), py::arg("isa") = "",
           "tensors: (name, array, dtype tag) triples; the arrays are borrowed, not copied.")
      .def_property_readonly("isa", [](const PyModel& p) { return p.model->isa(); })
      .def_property("threads", [](const PyModel& p) { return p.model->threads(); },
                    [](PyModel& p, int n) { p.model->set_threads(n); })
      .def_property_readonly("config", [](const PyModel& p) { return p.model->config(); })
      .def_property_readonly("weight_bytes_per_token", [](const PyModel& p) { return p.model->weight_bytes_per_token(); })
      .def("use_int8_lm_head", [](PyModel& p) { py::gil_scoped_release nogil; p.model->use_int8_lm_head(); },
           "Replace the lm_head by a per-row int8 copy (scale = max|row| / 127).")
      .def_property_readonly("int8_lm_head", [](const PyModel& p) { return p.model->int8_lm_head(); })
      .def(
          "new_cache",
          [](const PyModel& p, int64_t n_seqs, int64_t max_len, const std::string& dtype) {
            const ModelConfig& c = p.model->config();
            return std::make_unique<KVCache>(c, n_seqs, max_len <= 0 ? c.max_seq_len : max_len, parse_kv_type(dtype));
          },
          py::arg("n_seqs") = 1, py::arg("max_len") = 0, py::arg("dtype") = "f32",
          "dtype: \"f32\" (what training computes) or \"f16\" (half the cache bytes, rounded to nearest even).")
      .def(
          "forward",
          [](const PyModel& p, KVCache& cache, const std::vector<int64_t>& seq_ids,
             const std::vector<I32Array>& tokens, bool all_logits) {
            return forward_logits(p, cache, seq_ids, tokens, all_logits);
          },
          py::arg("cache"), py::arg("seq_ids"), py::arg("tokens"), py::arg("all_logits") = false,
          "Append tokens[i] to cache slot seq_ids[i]; logits (rows, vocab) for all new tokens or the last of each.");

  // ---- CUDA engine (csrc/cuda/): present when the build found nvcc ----
#ifdef BITNET_WITH_CUDA
  m.def("cuda_compiled", [] { return true; }, "Whether this build includes the CUDA engine.");
  m.def("cuda_device_count", &cuda::device_count, "Usable CUDA devices (0 without a driver or device).");
#else
  m.def("cuda_compiled", [] { return false; }, "Whether this build includes the CUDA engine.");
  m.def("cuda_device_count", [] { return 0; }, "Usable CUDA devices (0: this build has no CUDA engine).");
#endif
#ifdef BITNET_WITH_CUDA
  m.def("cuda_device_name", &cuda::device_name, py::arg("device") = 0);
  m.def(
      "cuda_bench_gemv",
      [](int device, int64_t out, int64_t in, int64_t rows, int iters) {
        py::gil_scoped_release nogil;
        return cuda::bench_ternary_gemv(device, out, in, rows, iters);
      },
      py::arg("device"), py::arg("out"), py::arg("in_features"), py::arg("rows") = 1, py::arg("iters") = 100,
      "Mean seconds per call of the ternary decode GEMV on a random (out, in_features) i2_b128 matrix.");

  py::class_<cuda::DeviceKVCache>(m, "CudaKVCache")
      .def_property_readonly("n_seqs", &cuda::DeviceKVCache::n_seqs)
      .def_property_readonly("max_len", &cuda::DeviceKVCache::max_len)
      .def_property_readonly("nbytes", &cuda::DeviceKVCache::bytes)
      .def("length", &cuda::DeviceKVCache::length, py::arg("seq"))
      .def("reset", &cuda::DeviceKVCache::reset, py::arg("seq") = -1, "Forget a sequence's tokens (seq < 0: all).")
      .def("truncate", &cuda::DeviceKVCache::truncate, py::arg("seq"), py::arg("length"),
           "Keep only the first `length` tokens of a sequence (prefix reuse).");

  py::class_<PyCudaModel>(m, "CudaModel")
      .def(py::init([](const ModelConfig& cfg, const std::vector<std::tuple<std::string, py::array, std::string>>& tensors,
                       int device) {
             auto pm = std::make_unique<PyCudaModel>();
             TensorMap map;
             for (const auto& [name, arr, tag] : tensors) {
               if (map.count(name)) throw std::invalid_argument("tensor '" + name + "' given twice");
               map[name] = tensor_ref(name, arr, parse_dtype(tag));
               pm->keep_alive.push_back(arr);
             }
             {
               py::gil_scoped_release nogil;
               pm->model = std::make_unique<cuda::DeviceModel>(cfg, map, device);
             }
             return pm;
           }),
           py::arg("config"), py::arg("tensors"), py::arg("device") = 0,
           "As Model, on CUDA device `device`; the tensors are validated as the CPU engine does, then uploaded.")
      .def_property_readonly("isa", [](const PyCudaModel&) { return std::string("cuda"); })
      .def_property("threads", [](const PyCudaModel&) { return 1; }, [](PyCudaModel&, int n) {
        if (n < 1 || n > 4096) throw std::invalid_argument("threads = " + std::to_string(n) + "; expected 1 .. 4096");
      })
      .def_property_readonly("device", [](const PyCudaModel& p) { return p.model->device(); })
      .def_property_readonly("device_name", [](const PyCudaModel& p) { return p.model->device_name(); })
      .def_property_readonly("device_bytes", [](const PyCudaModel& p) { return p.model->device_bytes(); })
      .def_property_readonly("config", [](const PyCudaModel& p) { return p.model->config(); })
      .def_property_readonly("weight_bytes_per_token", [](const PyCudaModel& p) { return p.model->weight_bytes_per_token(); })
      .def(
          "new_cache",
          [](const PyCudaModel& p, int64_t n_seqs, int64_t max_len) {
            const ModelConfig& c = p.model->config();
            return std::make_unique<cuda::DeviceKVCache>(c, p.model->device(), n_seqs, max_len <= 0 ? c.max_seq_len : max_len);
          },
          py::arg("n_seqs") = 1, py::arg("max_len") = 0)
      .def(
          "forward",
          [](const PyCudaModel& p, cuda::DeviceKVCache& cache, const std::vector<int64_t>& seq_ids,
             const std::vector<I32Array>& tokens, bool all_logits) {
            return forward_logits(p, cache, seq_ids, tokens, all_logits);
          },
          py::arg("cache"), py::arg("seq_ids"), py::arg("tokens"), py::arg("all_logits") = false,
          "As Model.forward, on the GPU; logits come back to host memory.")
      .def(
          "greedy_decode",
          [](const PyCudaModel& p, cuda::DeviceKVCache& cache, const std::vector<int64_t>& seq_ids, I32Array first,
             int64_t n_steps, bool use_graph) {
            if (first.ndim() != 1 || first.shape(0) != static_cast<py::ssize_t>(seq_ids.size()))
              throw std::invalid_argument("greedy_decode: first_tokens must be 1-D with one token per sequence slot");
            if (n_steps < 1) throw std::invalid_argument("greedy_decode: n_steps must be >= 1");
            py::array_t<int32_t> out({n_steps, static_cast<int64_t>(seq_ids.size())});
            int32_t* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              p.model->greedy_decode(cache, seq_ids, first.data(), n_steps, use_graph, o);
            }
            return out;
          },
          py::arg("cache"), py::arg("seq_ids"), py::arg("first_tokens"), py::arg("n_steps"), py::arg("use_graph") = true,
          "Greedy decoding on the device (CUDA graph per step): (n_steps, n_seqs) argmax tokens.");
#endif
}
