// core/: errors, logging, progress display, hashing and file helpers.
#pragma once

#include "core/error.h"
#include "core/fs.h"
#include "core/hash.h"
#include "core/log.h"
#include "core/progress.h"
