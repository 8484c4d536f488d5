// trainer/: the step loop, optimizer, schedule, checkpoints, metrics.
#pragma once

#include "trainer/checkpoint.h"
#include "trainer/metrics.h"
#include "trainer/objective.h"
#include "trainer/optimizer.h"
#include "trainer/options.h"
#include "trainer/schedule.h"
#include "trainer/trainer.h"
