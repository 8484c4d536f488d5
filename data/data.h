// data/: tokenizers (byte, Hugging Face BPE), token shards, corpora, the batch sampler, synthetic tasks.
#pragma once

#include "data/arith.h"
#include "data/bpe.h"
#include "data/corpus.h"
#include "data/options.h"
#include "data/prepare.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "data/tokenizer.h"
