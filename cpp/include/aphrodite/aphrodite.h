// Umbrella header of the aphrodite core library.
#pragma once

#include "aphrodite/attention.h"
#include "aphrodite/backend.h"
#include "aphrodite/buffer.h"
#include "aphrodite/engine/engine_core.h"
#include "aphrodite/error.h"
#include "aphrodite/image.h"
#include "aphrodite/layer_ops.h"
#include "aphrodite/linear.h"
#include "aphrodite/llava_projector.h"
#include "aphrodite/parallel.h"
#include "aphrodite/tensor.h"
