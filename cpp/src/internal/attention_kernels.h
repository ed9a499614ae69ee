// Plain parameter structs shared by the attention dispatch (cpp/src/attention/attention.cpp), the
// CPU kernels and the CUDA kernels (cuda/attention.cu). Pointers and sizes only, checked by the
// dispatch before any kernel sees them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "aphrodite/tensor.h"

namespace aphrodite::detail {

struct ReshapeAndCacheParams {
  const void* key = nullptr;    // [num_tokens, num_kv_heads, head_size], token stride below
  const void* value = nullptr;  // same shape as key
  void* key_cache = nullptr;    // [num_blocks, block_size, num_kv_heads, head_size], contiguous
  void* value_cache = nullptr;
  const void* slot_mapping = nullptr;  // [num_tokens]
  bool slot_mapping_is_int64 = true;
  std::int64_t key_token_stride = 0;  // elements
  std::int64_t value_token_stride = 0;
  std::int64_t num_tokens = 0;
  std::int64_t num_slots = 0;  // num_blocks * block_size
  int num_kv_heads = 0;
  int head_size = 0;
  DType dtype = DType::kFloat32;
};

struct PagedAttentionParams {
  void* out = nullptr;          // [num_tokens, num_heads, head_size], token stride below
  const void* query = nullptr;  // same shape as out
  const void* key_cache = nullptr;
  const void* value_cache = nullptr;
  const std::int32_t* block_tables = nullptr;     // [num_seqs, max_blocks_per_seq]
  const std::int32_t* seq_lens = nullptr;         // [num_seqs]
  const std::int32_t* query_start_loc = nullptr;  // [num_seqs + 1]
  std::int64_t query_token_stride = 0;            // elements
  std::int64_t out_token_stride = 0;
  int num_tokens = 0;
  int num_seqs = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_size = 0;
  int block_size = 0;
  int num_blocks = 0;
  int max_blocks_per_seq = 0;
  float scale = 1.0f;
  int sliding_window = 0;  // 0: none
  int max_query_len = 0;   // no sequence has more query tokens; 0: unknown
  DType dtype = DType::kFloat32;
  // CUDA only, set by paged_attention_cuda: the tensor-core kernels run (their shared memory
  // fits the device and APHRODITE_CUDA_ATTENTION_TENSOR_CORES is not 0).
  int cuda_tensor_cores = 0;
};

void reshape_and_cache_cpu(const ReshapeAndCacheParams& p);
void paged_attention_cpu(const PagedAttentionParams& p);

#ifdef APHRODITE_WITH_CUDA
void reshape_and_cache_cuda(const ReshapeAndCacheParams& p, int device, StreamHandle stream);
// Workspace for split contexts; shapes only (num_tokens, heads, head_size, the longest context
// the block table can hold).
std::size_t paged_attention_cuda_workspace_bytes(int num_tokens, int num_seqs, int num_heads,
                                                 int num_kv_heads, int head_size,
                                                 std::int64_t max_context, int device);
void paged_attention_cuda(const PagedAttentionParams& p, void* workspace,
                          std::size_t workspace_bytes, int device, StreamHandle stream);
#endif

}  // namespace aphrodite::detail
