// aphrodite._C.EngineConfig / EngineCore / SchedulerOutput: the engine core, bound one to one
// (see cpp/include/aphrodite/engine/engine_core.h and notes in ENGINE_API.md).
//
// Threading: the GIL is released around schedule() and update(); a per-core mutex serializes
// every call (always taken with the GIL released, so a thread waiting for it never blocks one
// that holds it and needs the GIL).
// Plan arrays are numpy views of the core's step buffers (no copy). Each view keeps the Python
// EngineCore alive, so it never dangles; its contents are those of the latest schedule().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <mutex>
#include <string>

#include "aphrodite/engine/engine_core.h"
#include "aphrodite/error.h"

namespace aphrodite::bindings {

namespace py = pybind11;
using engine::EngineConfig;
using engine::EngineCore;
using engine::FinishReason;
using engine::SchedulerOutput;

namespace {

struct PyEngineCore {
  explicit PyEngineCore(const EngineConfig& config) : core(config) {}
  EngineCore core;
  std::mutex mu;
};

// A plain record of one plan, built while the core's mutex is held.
struct PySchedulerOutput {
  std::int32_t num_seqs = 0;
  std::int32_t num_tokens = 0;
  py::list request_ids;
  py::array input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
      num_computed_tokens, logits_indices, sampled_seq_indices;
  py::list encoder_inputs, mm_embeds, freed_encoder_outputs, preempted_request_ids;
};

// Plan arrays are views of the core's step buffers, which later plans build on: read-only, so
// that a write through them cannot change the core's state.
py::array read_only(py::array a) {
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}

template <typename T>
py::array view_1d(const T* data, std::int64_t n, py::handle owner) {
  return read_only(
      py::array(py::dtype::of<T>(), {n}, {static_cast<std::int64_t>(sizeof(T))}, data, owner));
}

py::str to_str(std::string_view s) { return py::str(s.data(), s.size()); }

FinishReason parse_reason(const std::string& reason) {
  if (reason == "stop") return FinishReason::kStop;
  if (reason == "length") return FinishReason::kLength;
  if (reason == "abort") return FinishReason::kAbort;
  throw ValueError("finish_request: reason must be 'stop', 'length' or 'abort', got '" + reason +
                   "'");
}

// Token ids from a sequence of ints or an integer array; anything else (floats, bools, strings)
// and ids outside [0, 2^31) are refused rather than converted.
std::vector<std::int32_t> to_token_vector(py::handle obj, const char* name) {
  py::array arr = py::array::ensure(obj);
  if (!arr) throw TypeError(std::string(name) + " must be a sequence of ints or an int array");
  if (arr.ndim() != 1) throw ValueError(std::string(name) + " must be one-dimensional");
  if (arr.size() == 0) return {};  // (an empty list converts to a float64 array)
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw TypeError(std::string(name) + " must hold integers, got dtype " +
                    std::string(py::str(arr.dtype())));
  }
  auto ids = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  std::vector<std::int32_t> out(static_cast<std::size_t>(ids.size()));
  const std::int64_t* data = ids.data();
  for (std::size_t i = 0; i < out.size(); ++i) {
    const std::int64_t v = data[i];
    // (uint64 ids above 2^63 wrapped to negative values in the cast.)
    if (v < 0 || v > std::numeric_limits<std::int32_t>::max()) {
      throw ValueError(std::string(name) + ": token id " + std::to_string(v) +
                       " is out of range [0, 2^31)");
    }
    out[i] = static_cast<std::int32_t>(v);
  }
  return out;
}

PySchedulerOutput make_output(const SchedulerOutput& o, py::handle owner) {
  PySchedulerOutput p;
  p.num_seqs = o.num_seqs;
  p.num_tokens = o.num_tokens;
  for (std::string_view id : o.request_ids) p.request_ids.append(to_str(id));
  p.input_ids = view_1d(o.input_ids, o.num_tokens, owner);
  p.positions = view_1d(o.positions, o.num_tokens, owner);
  p.slot_mapping = view_1d(o.slot_mapping, o.num_tokens, owner);
  p.block_tables = read_only(py::array(
      py::dtype::of<std::int32_t>(),
      {static_cast<std::int64_t>(o.num_seqs), static_cast<std::int64_t>(o.max_blocks_per_seq)},
      {static_cast<std::int64_t>(o.max_blocks_per_seq) * 4, std::int64_t{4}}, o.block_tables,
      owner));
  p.seq_lens = view_1d(o.seq_lens, o.num_seqs, owner);
  p.query_start_loc = view_1d(o.query_start_loc, o.num_seqs + 1, owner);
  p.num_computed_tokens = view_1d(o.num_computed_tokens, o.num_seqs, owner);
  p.logits_indices = view_1d(o.logits_indices, o.num_sampled, owner);
  p.sampled_seq_indices = view_1d(o.sampled_seq_indices, o.num_sampled, owner);
  for (const auto& e : o.encoder_inputs) {
    p.encoder_inputs.append(py::make_tuple(to_str(e.request_id), e.mm_index));
  }
  for (const auto& e : o.mm_embeds) {
    p.mm_embeds.append(
        py::make_tuple(e.token_index, to_str(e.request_id), e.mm_index, e.start, e.length));
  }
  for (const auto& e : o.freed_encoder_outputs) {
    p.freed_encoder_outputs.append(py::make_tuple(e.request_id, e.mm_index));
  }
  for (const auto& id : o.preempted_request_ids) p.preempted_request_ids.append(id);
  return p;
}

}  // namespace

void bind_engine(py::module_& m) {
  py::class_<EngineConfig>(m, "EngineConfig", "Engine core configuration (see ENGINE_API.md).")
      .def(py::init([](std::int32_t num_blocks, std::int32_t block_size, std::int32_t max_num_seqs,
                       std::int32_t max_num_batched_tokens, std::int32_t max_model_len,
                       std::int32_t max_num_encoder_tokens, std::int32_t encoder_cache_size,
                       bool enable_prefix_caching, bool enable_chunked_prefill) {
             EngineConfig c;
             c.num_blocks = num_blocks;
             c.block_size = block_size;
             c.max_num_seqs = max_num_seqs;
             c.max_num_batched_tokens = max_num_batched_tokens;
             c.max_model_len = max_model_len;
             c.max_num_encoder_tokens = max_num_encoder_tokens;
             c.encoder_cache_size = encoder_cache_size;
             c.enable_prefix_caching = enable_prefix_caching;
             c.enable_chunked_prefill = enable_chunked_prefill;
             c.validate();
             return c;
           }),
           py::kw_only(), py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("max_num_seqs") = 256, py::arg("max_num_batched_tokens") = 2048,
           py::arg("max_model_len") = 4096, py::arg("max_num_encoder_tokens") = 2048,
           py::arg("encoder_cache_size") = 4096, py::arg("enable_prefix_caching") = true,
           py::arg("enable_chunked_prefill") = true)
      .def_readonly("num_blocks", &EngineConfig::num_blocks)
      .def_readonly("block_size", &EngineConfig::block_size)
      .def_readonly("max_num_seqs", &EngineConfig::max_num_seqs)
      .def_readonly("max_num_batched_tokens", &EngineConfig::max_num_batched_tokens)
      .def_readonly("max_model_len", &EngineConfig::max_model_len)
      .def_readonly("max_num_encoder_tokens", &EngineConfig::max_num_encoder_tokens)
      .def_readonly("encoder_cache_size", &EngineConfig::encoder_cache_size)
      .def_readonly("enable_prefix_caching", &EngineConfig::enable_prefix_caching)
      .def_readonly("enable_chunked_prefill", &EngineConfig::enable_chunked_prefill)
      .def_property_readonly("max_blocks_per_seq", &EngineConfig::max_blocks_per_seq)
      .def("__repr__", [](const EngineConfig& c) {
        return "EngineConfig(num_blocks=" + std::to_string(c.num_blocks) +
               ", block_size=" + std::to_string(c.block_size) +
               ", max_num_seqs=" + std::to_string(c.max_num_seqs) +
               ", max_num_batched_tokens=" + std::to_string(c.max_num_batched_tokens) +
               ", max_model_len=" + std::to_string(c.max_model_len) +
               ", max_num_encoder_tokens=" + std::to_string(c.max_num_encoder_tokens) +
               ", encoder_cache_size=" + std::to_string(c.encoder_cache_size) +
               ", enable_prefix_caching=" + (c.enable_prefix_caching ? "True" : "False") +
               ", enable_chunked_prefill=" + (c.enable_chunked_prefill ? "True" : "False") + ")";
      });

  py::class_<PySchedulerOutput>(m, "SchedulerOutput",
                                "One step's plan; arrays are views valid until the next "
                                "schedule() (see ENGINE_API.md)")
      .def_readonly("num_seqs", &PySchedulerOutput::num_seqs)
      .def_readonly("num_tokens", &PySchedulerOutput::num_tokens)
      .def_readonly("request_ids", &PySchedulerOutput::request_ids)
      .def_readonly("input_ids", &PySchedulerOutput::input_ids)
      .def_readonly("positions", &PySchedulerOutput::positions)
      .def_readonly("slot_mapping", &PySchedulerOutput::slot_mapping)
      .def_readonly("block_tables", &PySchedulerOutput::block_tables)
      .def_readonly("seq_lens", &PySchedulerOutput::seq_lens)
      .def_readonly("query_start_loc", &PySchedulerOutput::query_start_loc)
      .def_readonly("num_computed_tokens", &PySchedulerOutput::num_computed_tokens)
      .def_readonly("logits_indices", &PySchedulerOutput::logits_indices)
      .def_readonly("sampled_seq_indices", &PySchedulerOutput::sampled_seq_indices)
      .def_readonly("encoder_inputs", &PySchedulerOutput::encoder_inputs)
      .def_readonly("mm_embeds", &PySchedulerOutput::mm_embeds)
      .def_readonly("freed_encoder_outputs", &PySchedulerOutput::freed_encoder_outputs)
      .def_readonly("preempted_request_ids", &PySchedulerOutput::preempted_request_ids);

  py::class_<PyEngineCore>(m, "EngineCore", "The C++ engine core (see ENGINE_API.md).")
      .def(py::init<const EngineConfig&>(), py::arg("config"))
      .def(
          "add_request",
          [](PyEngineCore& self, const std::string& request_id, py::handle prompt_token_ids,
             const std::vector<std::tuple<std::int32_t, std::int32_t, py::bytes>>& mm_items,
             std::int32_t max_tokens, std::int32_t min_tokens, bool ignore_eos,
             std::int32_t eos_token_id, const std::vector<std::int32_t>& stop_token_ids,
             std::int32_t priority, std::optional<std::string> cache_salt) {
            engine::RequestParams p;
            p.prompt_token_ids = to_token_vector(prompt_token_ids, "prompt_token_ids");
            for (const auto& [offset, length, hash] : mm_items) {
              const std::string h = hash;
              if (h.size() != 32) {
                throw ValueError("add_request: an mm_items hash must be 32 bytes (SHA-256), got " +
                                 std::to_string(h.size()));
              }
              engine::MultiModalItem item;
              item.offset = offset;
              item.length = length;
              std::copy(h.begin(), h.end(), item.hash.begin());
              p.mm_items.push_back(item);
            }
            p.max_tokens = max_tokens;
            p.min_tokens = min_tokens;
            p.ignore_eos = ignore_eos;
            p.eos_token_id = eos_token_id;
            p.stop_token_ids = stop_token_ids;
            p.priority = priority;
            p.cache_salt = std::move(cache_salt);
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(self.mu);
            self.core.add_request(request_id, std::move(p));
          },
          py::arg("request_id"), py::arg("prompt_token_ids"),
          py::arg("mm_items") = std::vector<std::tuple<std::int32_t, std::int32_t, py::bytes>>{},
          py::arg("max_tokens") = 16, py::arg("min_tokens") = 0, py::arg("ignore_eos") = false,
          py::arg("eos_token_id") = -1, py::arg("stop_token_ids") = std::vector<std::int32_t>{},
          py::arg("priority") = 0, py::arg("cache_salt") = py::none())
      .def(
          "abort_request",
          [](PyEngineCore& self, const std::string& request_id) {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(self.mu);
            return self.core.abort_request(request_id);
          },
          py::arg("request_id"))
      .def(
          "finish_request",
          [](PyEngineCore& self, const std::string& request_id, const std::string& reason) {
            const FinishReason r = parse_reason(reason);
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(self.mu);
            return self.core.finish_request(request_id, r);
          },
          py::arg("request_id"), py::arg("reason") = "stop")
      .def("has_unfinished_requests",
           [](PyEngineCore& self) {
             py::gil_scoped_release release;
             std::lock_guard<std::mutex> lock(self.mu);
             return self.core.has_unfinished_requests();
           })
      .def_property_readonly("num_waiting",
                             [](PyEngineCore& self) {
                               py::gil_scoped_release release;
                               std::lock_guard<std::mutex> lock(self.mu);
                               return self.core.num_waiting();
                             })
      .def_property_readonly("num_running",
                             [](PyEngineCore& self) {
                               py::gil_scoped_release release;
                               std::lock_guard<std::mutex> lock(self.mu);
                               return self.core.num_running();
                             })
      .def("schedule",
           [](py::object self_obj) {
             PyEngineCore& self = self_obj.cast<PyEngineCore&>();
             std::unique_lock<std::mutex> lock(self.mu, std::defer_lock);
             const SchedulerOutput* out = nullptr;
             {
               py::gil_scoped_release release;
               lock.lock();
               out = &self.core.schedule();
             }
             return make_output(*out, self_obj);
           })
      .def(
          "update",
          [](PyEngineCore& self, py::handle sampled_token_ids) {
            std::vector<std::int32_t> sampled =
                to_token_vector(sampled_token_ids, "sampled_token_ids");
            std::unique_lock<std::mutex> lock(self.mu, std::defer_lock);
            const std::vector<engine::RequestEvent>* events = nullptr;
            {
              py::gil_scoped_release release;
              lock.lock();
              events = &self.core.update(sampled.data(), sampled.size());
            }
            py::list result;
            for (const auto& e : *events) {
              py::list tokens;
              if (e.has_token) tokens.append(e.token);
              py::object reason = py::none();
              if (e.finish_reason != FinishReason::kNone) {
                reason = py::str(engine::finish_reason_name(e.finish_reason));
              }
              py::object stop = e.stop_token >= 0 ? py::object(py::int_(e.stop_token)) : py::none();
              result.append(py::make_tuple(to_str(e.request_id), tokens, reason, stop));
            }
            return result;
          },
          py::arg("sampled_token_ids"))
      .def("stats",
           [](PyEngineCore& self) {
             engine::EngineStats st;
             {
               py::gil_scoped_release release;
               std::lock_guard<std::mutex> lock(self.mu);
               st = self.core.stats();
             }
             py::dict d;
             d["num_running"] = st.num_running;
             d["num_waiting"] = st.num_waiting;
             d["num_free_blocks"] = st.num_free_blocks;
             d["num_total_blocks"] = st.num_total_blocks;
             d["kv_cache_usage"] = st.kv_cache_usage;
             d["prefix_cache_queries"] = st.prefix_cache_queries;
             d["prefix_cache_hits"] = st.prefix_cache_hits;
             d["num_preemptions"] = st.num_preemptions;
             d["encoder_cache_usage"] = st.encoder_cache_usage;
             return d;
           })
      .def("reset_prefix_cache",
           [](PyEngineCore& self) {
             py::gil_scoped_release release;
             std::lock_guard<std::mutex> lock(self.mu);
             return self.core.reset_prefix_cache();
           })
      .def(
          "check_consistency",
          [](PyEngineCore& self) {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(self.mu);
            self.core.check_consistency();
          },
          "Verifies the core's block and encoder-cache bookkeeping; raises RuntimeError on a "
          "violation (for tests).")
      .def_property_readonly("config", [](PyEngineCore& self) { return self.core.config(); });

  m.def(
      "sha256",
      [](py::bytes data) {
        const std::string s = data;
        const engine::Sha256Digest d = engine::Sha256::hash(s.data(), s.size());
        return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
      },
      py::arg("data"), "SHA-256 digest (the core's own implementation, FIPS 180-4).");
}

}  // namespace aphrodite::bindings
