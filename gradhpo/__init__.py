"""gradhpo: gradient-based hyperparameter optimisation in JAX.

Tune continuous hyperparameters (L2 and weight decay, label smoothing,
augmentation magnitude, per-example weights, learning rate, momentum) by
hypergradients while the model trains, with one state pytree and one
optimizer interface shared by every algorithm.
"""

from gradhpo.core.base import BilevelOptimizer
from gradhpo.core.state import BilevelState
from gradhpo.algorithms.forward_mode import ForwardMode
from gradhpo.algorithms.forward_mode import ForwardModeState
from gradhpo.algorithms.greedy import Greedy
from gradhpo.algorithms.greedy import GreedyState
from gradhpo.algorithms.implicit import Implicit
from gradhpo.algorithms.implicit import ImplicitState
from gradhpo.algorithms.online import HyperDistill
from gradhpo.algorithms.online import HyperDistillState
from gradhpo.algorithms.t1_t2 import T1T2
from gradhpo.algorithms.t1_t2 import T1T2State
from gradhpo.algorithms.warm_start import OneShotWarmStart
from gradhpo.algorithms.warm_start import OneShotWarmStartState
from gradhpo.population import PopulationResult
from gradhpo.population import PopulationSearch
from gradhpo.population import PopulationState
from gradhpo.utils.checkpoint import load_state
from gradhpo.utils.checkpoint import save_state
from gradhpo.utils.parallel import init_population
from gradhpo.utils.parallel import make_mesh
from gradhpo.utils.parallel import replicate
from gradhpo.utils.parallel import shard_batch
from gradhpo.utils.parallel import shard_state

__version__ = "0.2.0"

# Optuna is optional: these names import gradhpo.integrations.resume or
# gradhpo.integrations.population_study (and Optuna) on first access only.
_LAZY = {"PausingScheduler": "gradhpo.integrations.resume",
         "PopulationStudyResult": "gradhpo.integrations.population_study",
         "ResumableObjective": "gradhpo.integrations.resume",
         "run_population_study": "gradhpo.integrations.population_study",
         "sqlite_storage": "gradhpo.integrations.resume"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradhpo' has no attribute {name!r}")


__all__ = [
    "BilevelOptimizer",
    "BilevelState",
    "ForwardMode",
    "ForwardModeState",
    "Greedy",
    "GreedyState",
    "HyperDistill",
    "HyperDistillState",
    "Implicit",
    "ImplicitState",
    "OneShotWarmStart",
    "OneShotWarmStartState",
    "PausingScheduler",
    "PopulationResult",
    "PopulationSearch",
    "PopulationState",
    "PopulationStudyResult",
    "ResumableObjective",
    "T1T2",
    "T1T2State",
    "init_population",
    "load_state",
    "make_mesh",
    "replicate",
    "run_population_study",
    "save_state",
    "shard_batch",
    "shard_state",
    "sqlite_storage",
]
