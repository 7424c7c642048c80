"""Client networks: the built-ins, the [model] table's names, seeded initialization, the checks
before a run, and flat-parameter helpers (docs/models.md).

- nets.py: LeNet, ResNet-18 (GroupNorm, CIFAR stem), MLP, LEAF's character LSTM;
- catalog.py: ModelSpec names -> factories (built-ins, `simfed.models` entry points,
  "package.module:factory"), `build(task)` and `initial(task, seed)`;
- init.py: seeded construction and re-initialization that never touch torch's global generator;
- needs.py: the checks (output size, buffers, dropout, a method's ModelNeeds, vmap);
- flat.py: a model's parameters as one flat vector.
"""

from simfed.algorithms.kit.models.catalog import (BUILTIN, DEFAULT, build, cache_key, describe_builtin,
                                                  entry_point_names, factory, initial, parse_spec, to_table)
from simfed.algorithms.kit.models.flat import count, flat_params, load_flat, param_shapes, unflatten
from simfed.algorithms.kit.models.init import constructed, init_model, init_modules_
from simfed.algorithms.kit.models.needs import (chain_tokens, check_task, dummy_input, head_modules, head_size,
                                                needs_problem, vmap_problem)
from simfed.algorithms.kit.models.nets import LeNet, lenet_for

__all__ = ["BUILTIN", "DEFAULT", "LeNet", "build", "cache_key", "chain_tokens", "check_task", "constructed", "count",
           "describe_builtin", "dummy_input", "entry_point_names", "factory", "flat_params", "head_modules",
           "head_size", "init_model", "init_modules_", "initial", "lenet_for", "load_flat", "needs_problem",
           "param_shapes", "parse_spec", "to_table", "unflatten", "vmap_problem"]
