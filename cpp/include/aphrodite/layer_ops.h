// The small ops of a Llama decoder layer around its GEMMs and attention, each one pass over its
// rows (vLLM's layernorm, rotary and activation kernels): RMSNorm, RMSNorm fused with the residual
// add, the rotary position embedding applied in place, and SiLU-and-multiply.
//
// Each op rounds where HF transformers' eager PyTorch code rounds, so that float16/bfloat16
// results match it (rotary_embedding bit for bit; the others up to the order of a float32 sum or
// the exp implementation): the arithmetic is float32, and a value is rounded to the tensors'
// dtype wherever torch would store an intermediate tensor of that dtype.
//
// Dtypes float32, float16 and bfloat16 on every backend; the tensors of one call share a dtype
// (cos/sin tables are float32). Rows may be strided (a slice of a wider tensor) but each row is
// dense. The backend is chosen by the tensors' device; on CUDA the kernels run on `stream`, never
// synchronise and never allocate.
#pragma once

#include "aphrodite/tensor.h"

namespace aphrodite {

// out [rows, hidden] = weight * dtype(x * rsqrt(mean(x^2) + eps)), with x [rows, hidden] and
// weight [hidden] (Llama's RMSNorm: the normalised value is rounded before the weight multiplies
// it). out may be x itself.
void rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps,
              StreamHandle stream = 0);

// In place, both [rows, hidden]: residual = dtype(x + residual), then x = rms_norm(residual): a
// decoder layer's residual add followed by the next norm, in one pass.
void fused_add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                        float eps, StreamHandle stream = 0);

// In place on query [tokens, num_heads, head_size] and key [tokens, num_kv_heads, head_size]
// (dense [heads, head_size], any token stride: slices of a fused QKV output): the rotary embedding
// of GPT-NeoX / Llama (rotate_half), x * cos + rotate_half(x) * sin, with cos and sin looked up at
// positions [tokens] (int64 or int32) in float32 tables [max_positions, head_size] and rounded to
// the dtype first, as HF does. A position outside the tables is a ValueError on the CPU; the CUDA
// kernel, which cannot report it, leaves that token unrotated.
void rotary_embedding(const TensorView& positions, const TensorView& query, const TensorView& key,
                      const TensorView& cos, const TensorView& sin, StreamHandle stream = 0);

// out [rows, n] = dtype(silu(x[:, :n])) * x[:, n:] for x [rows, 2n] (the gate and up halves of a
// fused gate_up projection).
void silu_and_mul(const TensorView& out, const TensorView& x, StreamHandle stream = 0);

}  // namespace aphrodite
