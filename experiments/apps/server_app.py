"""The spying ServerApp for Flower's deployment engine (``flwr run``, SuperLink, SuperNodes).

``python -m experiments.run`` drives the simulation engine itself; a deployment loads a
ServerApp by name (pyproject's ``[tool.flwr.app.components]``). This one builds the experiment
plan from the run config (:meth:`experiments.plan.ExperimentPlan.from_mapping`, the same
function and rules as every other entry point, for the deployment engine) and carries it out
with :class:`experiments.experiment.Experiment` on the grid it is given: the honest server,
the intercepting strategy and the attack runner when the plan attacks, the same run folder
(``out-dir``: rounds.csv, dropped.csv, results.csv, figures, summary.md).

SIGTERM (the SuperLink stopping the app, ``flwr stop``) stops the run at its next wait for
replies: the round in flight is abandoned, unfinished attacks are marked interrupted and the
summary is written. A run whose round has no valid reply ends failed, with the reason.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..experiment import Experiment
from ..plan import ExperimentPlan
from ..run_folder import default_run_dir
from ..stopping import StopOnSignal

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = ExperimentPlan.from_mapping(dict(context.run_config), engine="deployment")
    plan.check_data()
    if not plan.fed.out_dir:
        plan = plan.replace(out_dir=str(default_run_dir()))
    with StopOnSignal() as stopper:
        experiment = Experiment(plan, stop=stopper.event)
        experiment.serve(grid)
        experiment.finish()
    if experiment.failure:
        raise RuntimeError(experiment.failure)
