// moe/: DeepSeekMoE layers (router, aux-loss-free balancing, token permutation,
// grouped experts, expert-parallel dispatch/combine) and a slow reference implementation for tests and benchmarks.
#pragma once

#include "moe/expert_parallel.h"
#include "moe/experts.h"
#include "moe/layer.h"
#include "moe/options.h"
#include "moe/permute.h"
#include "moe/reference.h"
#include "moe/router.h"
#include "moe/swiglu.h"
