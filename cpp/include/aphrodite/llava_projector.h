// The LLaVA multimodal projector: maps vision-tower features into the language model's
// embedding space with two linear layers and a GELU between them:
//   out = gelu(x @ w1^T + b1) @ w2^T + b2
// x [T, vision_hidden], w1 [H, vision_hidden], b1 [H], w2 [D, H], b2 [D], out [T, D].
#pragma once

#include <optional>

#include "aphrodite/linear.h"
#include "aphrodite/tensor.h"

namespace aphrodite {

// `gelu` is Activation::kGeluErf or kGeluTanh. dtypes and devices as for linear(); each GEMM's
// epilogue fuses its bias (and the GELU for the first one). `workspace`, when given, holds the
// intermediate activations: a contiguous [T, H] tensor of x's dtype on x's device; without it
// the intermediate is allocated for the call (on CUDA: a cudaMalloc, so pass a workspace when
// capturing CUDA graphs).
void llava_projector(const TensorView& out, const TensorView& x, const TensorView& w1,
                     const TensorView& b1, const TensorView& w2, const TensorView& b2,
                     Activation gelu = Activation::kGeluErf,
                     const std::optional<TensorView>& workspace = std::nullopt,
                     StreamHandle stream = 0);

}  // namespace aphrodite
