// distill/: the distillation pipeline. Nothing here yet (see README.md).
#pragma once
