// The LLaVA projector as two fused-epilogue linear calls around an intermediate [T, H] tensor.
#include "aphrodite/llava_projector.h"

#include <string>

#include "aphrodite/buffer.h"

namespace aphrodite {

void llava_projector(const TensorView& out, const TensorView& x, const TensorView& w1,
                     const TensorView& b1, const TensorView& w2, const TensorView& b2,
                     Activation gelu, const std::optional<TensorView>& workspace,
                     StreamHandle stream) {
  if (gelu != Activation::kGeluErf && gelu != Activation::kGeluTanh) {
    throw ValueError(
        std::string("the projector's activation must be 'gelu' or 'gelu_tanh', got '") +
        activation_name(gelu) + "'");
  }
  // The projector's own checks name its arguments; linear() repeats the layout checks.
  check_dim(x, "x", 2);
  check_dim(w1, "w1", 2);
  check_dim(w2, "w2", 2);
  const std::int64_t tokens = x.size(0);
  const std::int64_t hidden = w1.size(0);
  const std::int64_t out_features = w2.size(0);
  check_shape(w1, "w1", {hidden, x.size(1)});
  check_shape(b1, "b1", {hidden});
  check_shape(w2, "w2", {out_features, hidden});
  check_shape(b2, "b2", {out_features});
  check_shape(out, "out", {tokens, out_features});
  if (x.device().is_cpu()) {
    check_dtype(x, "x", {DType::kFloat32});
  } else {
    check_dtype(x, "x", {DType::kFloat16, DType::kBFloat16});
  }
  const TensorView* same_dtype[] = {&w1, &b1, &w2, &b2, &out};
  const char* names[] = {"w1", "b1", "w2", "b2", "out"};
  for (int i = 0; i < 5; ++i) {
    check_dtype(*same_dtype[i], names[i], {x.dtype()});
    check_same_device(*same_dtype[i], names[i], x, "x");
  }

  OwnedTensor owned;
  TensorView intermediate;
  if (workspace) {
    check_contiguous(*workspace, "workspace");
    check_shape(*workspace, "workspace", {tokens, hidden});
    check_dtype(*workspace, "workspace", {x.dtype()});
    check_same_device(*workspace, "workspace", x, "x");
    // Written by the first GEMM, which reads these...
    check_no_overlap(*workspace, "workspace", x, "x");
    check_no_overlap(*workspace, "workspace", w1, "w1");
    check_no_overlap(*workspace, "workspace", b1, "b1");
    // ...before the second reads these.
    check_no_overlap(*workspace, "workspace", w2, "w2");
    check_no_overlap(*workspace, "workspace", b2, "b2");
    check_no_overlap(*workspace, "workspace", out, "out");
    intermediate = *workspace;
  } else {
    owned = OwnedTensor::empty({tokens, hidden}, x.dtype(), x.device());
    intermediate = owned.view;
  }
  linear(intermediate, x, w1, b1, gelu, stream);
  linear(out, intermediate, w2, b2, Activation::kNone, stream);
}

}  // namespace aphrodite
