"""Integrations with hyperparameter-search schedulers (optional extras).

:mod:`gradhpo.integrations.pasha` provides :class:`PASHAPruner`, PASHA
(progressive resource allocation on top of asynchronous successive halving)
as an ``optuna.pruners.BasePruner``. Optuna is an optional dependency
(``pip install gradhpo[optuna]``): this package does not import it, only the
submodules that need it do, so ``import gradhpo`` works without Optuna.
"""
