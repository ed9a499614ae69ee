// Argument checks and backend dispatch for reshape_and_cache and paged_attention.
#include "aphrodite/attention.h"

#include <limits>
#include <string>

#include "aphrodite/backend.h"
#include "internal/attention_kernels.h"

namespace aphrodite {

namespace {

void fail(const std::string& message) { throw ValueError(message); }

std::vector<DType> allowed_dtypes(Device device) {
  if (device.is_cuda()) return {DType::kFloat16, DType::kBFloat16};
  return {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
}

// Cache tensors: [num_blocks, block_size, num_kv_heads, head_size], contiguous.
void check_cache(const TensorView& t, const char* name) {
  check_dim(t, name, 4);
  check_contiguous(t, name);
  const std::int64_t block_size = t.size(1);
  if (block_size != 8 && block_size != 16 && block_size != 32) {
    fail(std::string(name) + " block_size (dim 1) must be 8, 16 or 32, got " + t.describe());
  }
  if (t.size(3) % 8 != 0) {
    fail(std::string(name) + " head_size (dim 3) must be a multiple of 8, got " + t.describe());
  }
  if (t.size(2) < 1 || t.size(3) < 1) {
    fail(std::string(name) + " must have at least one kv head and a positive head_size, got " +
         t.describe());
  }
}

#ifdef APHRODITE_WITH_CUDA
void check_cuda_head_size(std::int64_t head_size) {
  switch (head_size) {
    case 64:
    case 80:
    case 96:
    case 112:
    case 128:
    case 256:
      return;
    default:
      fail("CUDA paged attention supports head sizes 64, 80, 96, 112, 128 and 256, got " +
           std::to_string(head_size));
  }
}
#endif

bool fits_int32(std::int64_t v) { return v >= 0 && v <= std::numeric_limits<std::int32_t>::max(); }

}  // namespace

void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                       const TensorView& value_cache, const TensorView& slot_mapping,
                       StreamHandle stream) {
  const Device device = key_cache.device();
  check_same_device(key, "key", key_cache, "key_cache");
  check_same_device(value, "value", key_cache, "key_cache");
  check_same_device(value_cache, "value_cache", key_cache, "key_cache");
  check_same_device(slot_mapping, "slot_mapping", key_cache, "key_cache");
  check_dtype(key_cache, "key_cache", allowed_dtypes(device));
  check_same_dtype(value_cache, "value_cache", key_cache, "key_cache");
  check_same_dtype(key, "key", key_cache, "key_cache");
  check_same_dtype(value, "value", key_cache, "key_cache");
  check_dtype(slot_mapping, "slot_mapping", {DType::kInt64, DType::kInt32});
  check_cache(key_cache, "key_cache");
  check_shape(value_cache, "value_cache",
              {key_cache.size(0), key_cache.size(1), key_cache.size(2), key_cache.size(3)});
  check_token_major(key, "key");
  check_token_major(value, "value");
  const std::int64_t num_tokens = key.size(0);
  check_shape(key, "key", {-1, key_cache.size(2), key_cache.size(3)});
  check_shape(value, "value", {num_tokens, key_cache.size(2), key_cache.size(3)});
  check_shape(slot_mapping, "slot_mapping", {num_tokens});
  check_contiguous(slot_mapping, "slot_mapping");
  check_no_overlap(key_cache, "key_cache", value_cache, "value_cache");
  for (const TensorView* cache : {&key_cache, &value_cache}) {
    const char* name = cache == &key_cache ? "key_cache" : "value_cache";
    check_no_overlap(*cache, name, key, "key");
    check_no_overlap(*cache, name, value, "value");
    check_no_overlap(*cache, name, slot_mapping, "slot_mapping");
  }

  detail::ReshapeAndCacheParams p;
  p.key = key.data();
  p.value = value.data();
  p.key_cache = key_cache.data();
  p.value_cache = value_cache.data();
  p.slot_mapping = slot_mapping.data();
  p.slot_mapping_is_int64 = slot_mapping.dtype() == DType::kInt64;
  p.key_token_stride = key.stride(0);
  p.value_token_stride = value.stride(0);
  p.num_tokens = num_tokens;
  p.num_slots = key_cache.size(0) * key_cache.size(1);
  p.num_kv_heads = static_cast<int>(key_cache.size(2));
  p.head_size = static_cast<int>(key_cache.size(3));
  p.dtype = key_cache.dtype();
  if (num_tokens == 0) return;

  if (device.is_cpu()) {
    backend_for(device);
    detail::reshape_and_cache_cpu(p);
    return;
  }
  backend_for(device);
#ifdef APHRODITE_WITH_CUDA
  detail::reshape_and_cache_cuda(p, device.index, stream);
#else
  (void)stream;
#endif
}

namespace {

struct AttentionShapes {
  int num_tokens, num_seqs, num_heads, num_kv_heads, head_size, block_size, max_blocks;
};

AttentionShapes check_attention_shapes(const TensorView& query, const TensorView& key_cache,
                                       const TensorView& block_tables) {
  check_token_major(query, "query");
  check_cache(key_cache, "key_cache");
  check_dim(block_tables, "block_tables", 2);
  check_dtype(block_tables, "block_tables", {DType::kInt32});
  check_contiguous(block_tables, "block_tables");
  const std::int64_t num_kv_heads = key_cache.size(2);
  const std::int64_t head_size = key_cache.size(3);
  check_shape(query, "query", {-1, -1, head_size});
  if (query.size(1) < 1) fail("query must have at least one head, got " + query.describe());
  if (query.size(1) % num_kv_heads != 0) {
    fail("query heads (" + std::to_string(query.size(1)) +
         ") must be a multiple of the cache's kv heads (" + std::to_string(num_kv_heads) + ")");
  }
  if (!fits_int32(query.size(0)) || !fits_int32(key_cache.size(0)) ||
      !fits_int32(block_tables.size(0)) || !fits_int32(block_tables.size(1))) {
    fail("paged_attention sizes must fit in int32");
  }
  return {static_cast<int>(query.size(0)),       static_cast<int>(block_tables.size(0)),
          static_cast<int>(query.size(1)),       static_cast<int>(num_kv_heads),
          static_cast<int>(head_size),           static_cast<int>(key_cache.size(1)),
          static_cast<int>(block_tables.size(1))};
}

}  // namespace

std::size_t paged_attention_workspace_bytes(const TensorView& query, const TensorView& key_cache,
                                            const TensorView& block_tables) {
  const AttentionShapes s = check_attention_shapes(query, key_cache, block_tables);
  const Device device = key_cache.device();
  if (device.is_cpu()) return 0;
  backend_for(device);
#ifdef APHRODITE_WITH_CUDA
  return detail::paged_attention_cuda_workspace_bytes(
      s.num_tokens, s.num_seqs, s.num_heads, s.num_kv_heads, s.head_size,
      static_cast<std::int64_t>(s.max_blocks) * s.block_size, device.index);
#else
  (void)s;
  return 0;
#endif
}

void paged_attention(const TensorView& out, const TensorView& query, const TensorView& key_cache,
                     const TensorView& value_cache, const TensorView& block_tables,
                     const TensorView& seq_lens, const TensorView& query_start_loc, float scale,
                     int sliding_window, const TensorView* workspace, StreamHandle stream,
                     int max_query_len) {
  const Device device = key_cache.device();
  check_same_device(query, "query", key_cache, "key_cache");
  check_same_device(out, "out", key_cache, "key_cache");
  check_same_device(value_cache, "value_cache", key_cache, "key_cache");
  check_same_device(block_tables, "block_tables", key_cache, "key_cache");
  check_same_device(seq_lens, "seq_lens", key_cache, "key_cache");
  check_same_device(query_start_loc, "query_start_loc", key_cache, "key_cache");
  check_dtype(key_cache, "key_cache", allowed_dtypes(device));
  check_same_dtype(value_cache, "value_cache", key_cache, "key_cache");
  check_same_dtype(query, "query", key_cache, "key_cache");
  check_same_dtype(out, "out", key_cache, "key_cache");
  const AttentionShapes s = check_attention_shapes(query, key_cache, block_tables);
  check_shape(value_cache, "value_cache",
              {key_cache.size(0), key_cache.size(1), key_cache.size(2), key_cache.size(3)});
  check_token_major(out, "out");
  check_shape(out, "out", {query.size(0), query.size(1), query.size(2)});
  check_no_overlap(out, "out", query, "query", /*same_ok=*/true);
  check_no_overlap(out, "out", key_cache, "key_cache");
  check_no_overlap(out, "out", value_cache, "value_cache");
  check_dtype(seq_lens, "seq_lens", {DType::kInt32});
  check_dtype(query_start_loc, "query_start_loc", {DType::kInt32});
  check_shape(seq_lens, "seq_lens", {s.num_seqs});
  check_shape(query_start_loc, "query_start_loc", {s.num_seqs + 1});
  check_contiguous(seq_lens, "seq_lens");
  check_contiguous(query_start_loc, "query_start_loc");
  if (sliding_window < 0)
    fail("sliding_window must be >= 0, got " + std::to_string(sliding_window));
  if (max_query_len < 0)
    fail("max_query_len must be >= 0 (0: unknown), got " + std::to_string(max_query_len));
  if (!(scale > 0.0f) || scale == std::numeric_limits<float>::infinity()) {
    fail("scale must be a positive finite number, got " + std::to_string(scale));
  }

  detail::PagedAttentionParams p;
  p.out = out.data();
  p.query = query.data();
  p.key_cache = key_cache.data();
  p.value_cache = value_cache.data();
  p.block_tables = block_tables.data_as<const std::int32_t>();
  p.seq_lens = seq_lens.data_as<const std::int32_t>();
  p.query_start_loc = query_start_loc.data_as<const std::int32_t>();
  p.query_token_stride = query.stride(0);
  p.out_token_stride = out.stride(0);
  p.num_tokens = s.num_tokens;
  p.num_seqs = s.num_seqs;
  p.num_heads = s.num_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_size = s.head_size;
  p.block_size = s.block_size;
  p.num_blocks = static_cast<int>(key_cache.size(0));
  p.max_blocks_per_seq = s.max_blocks;
  p.scale = scale;
  p.sliding_window = sliding_window;
  p.max_query_len = max_query_len;
  p.dtype = key_cache.dtype();
  if (s.num_tokens == 0 || s.num_seqs == 0) return;

  if (device.is_cpu()) {
    backend_for(device);
    detail::paged_attention_cpu(p);
    return;
  }
  backend_for(device);
#ifdef APHRODITE_WITH_CUDA
  check_cuda_head_size(p.head_size);
  void* workspace_data = nullptr;
  std::size_t workspace_bytes = 0;
  if (workspace != nullptr) {
    check_same_device(*workspace, "workspace", key_cache, "key_cache");
    check_dtype(*workspace, "workspace", {DType::kUInt8});
    check_contiguous(*workspace, "workspace");
    workspace_data = workspace->data();
    workspace_bytes = workspace->nbytes();
  }
  detail::paged_attention_cuda(p, workspace_data, workspace_bytes, device.index, stream);
#else
  (void)workspace;
  (void)stream;
#endif
}

}  // namespace aphrodite
