// model/: the transformer, generation, weight formats (safetensors, Hugging Face
// checkpoints, GGUF).
#pragma once

#include "model/generate.h"
#include "model/gguf.h"
#include "model/gguf_export.h"
#include "model/gguf_import.h"
#include "model/hf.h"
#include "model/safetensors.h"
#include "model/transformer.h"
