// Paged KV cache write and paged attention: the two kernels every decoder layer calls.
//
// KV cache layout (one K and one V tensor per layer, allocated by the caller):
//   [num_blocks, block_size, num_kv_heads, head_size], contiguous, block_size 8, 16 or 32.
// A token's cache slot is block_id * block_size + offset_in_block; slot -1 means "do not cache".
//
// One paged_attention call serves a whole mixed batch (prefill chunks and decode tokens):
//   query_start_loc [num_seqs + 1] (int32): sequence s owns query tokens
//     [query_start_loc[s], query_start_loc[s + 1]) (q_len tokens, possibly 0);
//   seq_lens [num_seqs] (int32): the context length of s INCLUDING this step's tokens, whose K/V
//     reshape_and_cache already wrote;
//   block_tables [num_seqs, max_blocks_per_seq] (int32): the cache blocks of each sequence in
//   order.
// Query token j of sequence s sits at position seq_lens[s] - q_len + j and attends to the keys at
// positions <= its own (causal), and with sliding_window > 0 only to positions
// > position - sliding_window (as in HF/Mistral).
//
// Dtypes: on the CPU float32, float16 or bfloat16 (all accumulation in float32); on CUDA float16
// or bfloat16. query, out and the caches share one dtype. Head sizes: any multiple of 8 on the
// CPU; 64, 80, 96, 112, 128 and 256 on CUDA. query/out may be strided in the token dimension
// (slices of a fused QKV output) but [heads, head_size] must be dense.
//
// The backend is chosen by the tensors' device; every tensor argument must be on that device.
// On CUDA the kernels run on `stream`, never synchronise and never allocate, so the calls can be
// captured in a CUDA graph. The CUDA kernels trust the device-side metadata (block ids, lengths):
// the CPU path validates it, so run a bad batch on the CPU to find what is wrong with it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "aphrodite/tensor.h"

namespace aphrodite {

// Writes key/value [num_tokens, num_kv_heads, head_size] into key_cache/value_cache at
// slot_mapping [num_tokens] (int64 or int32); tokens whose slot is -1 are skipped.
void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                       const TensorView& value_cache, const TensorView& slot_mapping,
                       StreamHandle stream = 0);

// Bytes of workspace with which paged_attention may split long contexts across CUDA thread
// blocks (flash-decoding) for these shapes; 0 on the CPU. The figure depends only on shapes, so
// a workspace sized once serves every replay of a captured CUDA graph.
std::size_t paged_attention_workspace_bytes(const TensorView& query, const TensorView& key_cache,
                                            const TensorView& block_tables);

// out [num_tokens, num_heads, head_size] = attention of query [num_tokens, num_heads, head_size]
// over each sequence's cached context. `workspace` (optional, a CUDA uint8 tensor on the query's
// device) enables split contexts when it holds at least paged_attention_workspace_bytes(); without
// it (or with a smaller one) each (tokens, head) tile is computed by one thread block. The CPU
// kernels need none and ignore it.
// `max_query_len` > 0 promises that no sequence has more query tokens (the scheduler knows it on
// the host; 0: unknown). On CUDA it spares the launches of the kernels for longer queries, e.g. a
// decode-only batch (max_query_len 1) runs the decode kernel alone; like the rest of the
// metadata, the CUDA kernels trust it (a longer sequence would keep rows of `out` unwritten),
// and the CPU checks it.
void paged_attention(const TensorView& out, const TensorView& query, const TensorView& key_cache,
                     const TensorView& value_cache, const TensorView& block_tables,
                     const TensorView& seq_lens, const TensorView& query_start_loc, float scale,
                     int sliding_window = 0, const TensorView* workspace = nullptr,
                     StreamHandle stream = 0, int max_query_len = 0);

}  // namespace aphrodite
