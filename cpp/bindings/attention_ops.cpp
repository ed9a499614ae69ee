// Bindings of the attention ops: reshape_and_cache, paged_attention and its workspace size.
#include <pybind11/pybind11.h>

#include "aphrodite/attention.h"
#include "tensor_bridge.h"

namespace aphrodite::bindings {

namespace py = pybind11;

void bind_attention_ops(py::module_& ops) {
  ops.def(
      "reshape_and_cache",
      [](py::handle key, py::handle value, py::handle key_cache, py::handle value_cache,
         py::handle slot_mapping, std::uintptr_t stream) {
        const ImportedTensor k = import_tensor(key, "key");
        const ImportedTensor v = import_tensor(value, "value");
        const ImportedTensor kc = import_tensor(key_cache, "key_cache", /*writable=*/true);
        const ImportedTensor vc = import_tensor(value_cache, "value_cache", /*writable=*/true);
        const ImportedTensor slots = import_tensor(slot_mapping, "slot_mapping");
        py::gil_scoped_release release;
        aphrodite::reshape_and_cache(k, v, kc, vc, slots, stream);
      },
      py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"),
      py::arg("slot_mapping"), py::kw_only(), py::arg("stream") = 0,
      "Writes key/value [num_tokens, num_kv_heads, head_size] into the paged caches "
      "[num_blocks, block_size, num_kv_heads, head_size] at slot_mapping (-1: skip).");

  ops.def(
      "paged_attention_workspace_bytes",
      [](py::handle query, py::handle key_cache, py::handle block_tables) {
        const ImportedTensor q = import_tensor(query, "query");
        const ImportedTensor kc = import_tensor(key_cache, "key_cache");
        const ImportedTensor bt = import_tensor(block_tables, "block_tables");
        return aphrodite::paged_attention_workspace_bytes(q, kc, bt);
      },
      py::arg("query"), py::arg("key_cache"), py::arg("block_tables"),
      "Bytes of workspace that let paged_attention split long contexts on CUDA (0 on the CPU).");

  ops.def(
      "paged_attention",
      [](py::handle out, py::handle query, py::handle key_cache, py::handle value_cache,
         py::handle block_tables, py::handle seq_lens, py::handle query_start_loc, float scale,
         int sliding_window, py::handle workspace, std::uintptr_t stream, int max_query_len) {
        const ImportedTensor o = import_tensor(out, "out", /*writable=*/true);
        const ImportedTensor q = import_tensor(query, "query");
        const ImportedTensor kc = import_tensor(key_cache, "key_cache");
        const ImportedTensor vc = import_tensor(value_cache, "value_cache");
        const ImportedTensor bt = import_tensor(block_tables, "block_tables");
        const ImportedTensor sl = import_tensor(seq_lens, "seq_lens");
        const ImportedTensor qsl = import_tensor(query_start_loc, "query_start_loc");
        const std::optional<ImportedTensor> ws =
            import_optional_tensor(workspace, "workspace", /*writable=*/true);
        const TensorView* ws_view = ws ? &ws->view() : nullptr;
        py::gil_scoped_release release;
        aphrodite::paged_attention(o, q, kc, vc, bt, sl, qsl, scale, sliding_window, ws_view,
                                   stream, max_query_len);
      },
      py::arg("out"), py::arg("query"), py::arg("key_cache"), py::arg("value_cache"),
      py::arg("block_tables"), py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("scale"),
      py::arg("sliding_window") = 0, py::kw_only(), py::arg("workspace") = py::none(),
      py::arg("stream") = 0, py::arg("max_query_len") = 0,
      "Paged attention over a mixed batch of prefill chunks and decode tokens; see "
      "aphrodite/attention.h for the metadata contract.");
}

}  // namespace aphrodite::bindings
