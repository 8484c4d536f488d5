// parallel/: world description, and later communicators and process groups.
#pragma once

#include "parallel/world.h"
