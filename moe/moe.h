// moe/: Mixture-of-Experts layers. Nothing here yet (see README.md).
#pragma once
