"""Integrations with hyperparameter-search schedulers (optional extras).

:mod:`gradhpo.integrations.pasha` provides :class:`PASHAPruner`, PASHA
(progressive resource allocation on top of asynchronous successive halving)
as an ``optuna.pruners.BasePruner``; :mod:`gradhpo.integrations.resume`
provides pause and resume for promotion-type ASHA and PASHA
(:class:`ResumableObjective`, :class:`PausingScheduler`). Optuna is an
optional dependency (``pip install gradhpo[optuna]``): this package does not
import it, only the submodules that need it do, so ``import gradhpo`` works
without Optuna.
"""
