"""An HPO benchmark of gradhpo against Optuna at equal counted compute.

Run ``python benchmarks/hpo/run.py --help``. Modules:

* :mod:`hpo.tasks` -- the tasks (data, model, losses, evaluation);
* :mod:`hpo.methods` -- the methods, each spending a budget of gradient
  evaluations and returning one tested model;
* :mod:`hpo.report` -- the table, the paired statistics and the plots;
* ``run.py`` -- the command line.
"""
