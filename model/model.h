// model/: the transformer, generation, weight formats.
#pragma once

#include "model/generate.h"
#include "model/safetensors.h"
#include "model/transformer.h"
