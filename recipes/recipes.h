// recipes/: YAML recipes and the schema that turns them into Options structs.
#pragma once

#include "recipes/build.h"
#include "recipes/recipe.h"
