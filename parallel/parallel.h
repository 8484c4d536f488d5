// parallel/: who this process is among the ranks of a job (world.h) and how
// ranks talk (communicator.h: MPI, NCCL, single-process; groups by split()).
#pragma once

#include "parallel/communicator.h"
#include "parallel/options.h"
#include "parallel/ordered_sum.h"
#include "parallel/reducer.h"
#include "parallel/world.h"
