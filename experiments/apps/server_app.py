"""The spying ServerApp for Flower's deployment engine (``flwr run``, SuperLink, SuperNodes).

``python -m experiments.run`` drives the simulation engine itself; a deployment loads a
ServerApp by name (pyproject's ``[tool.flwr.app.components]``). This one builds the experiment
plan from the run config (:meth:`experiments.plan.ExperimentPlan.from_mapping`, the same
function and rules as every other entry point, for the deployment engine) and carries it out
with :class:`experiments.experiment.Experiment` on the grid it is given: the honest server,
the intercepting strategy and the attack runner when the plan attacks, the same run folder
(``out-dir``: rounds.csv, dropped.csv, results.csv, figures, summary.md).

The federation's size: a run config that names ``num-clients`` (``experiments.deploy`` and
the compose file always do) gets that many partitions, and the server waits for that many
nodes. One that leaves it at pyproject's default (plain ``flwr run .``) gets the number of
nodes connected to the run (:func:`fl_sim.server_app.federation_size`): under Flower's
simulation runtime that is its ``num-supernodes``, which is also every node's
``num-partitions``, so the server's plan and the clients' partitions agree.

SIGTERM (the SuperLink stopping the app, ``flwr stop``) stops the run at its next wait for
replies: the round in flight is abandoned, unfinished attacks are marked interrupted and the
summary is written. A run that fails (a refused plan, a round with no valid reply) raises, so
Flower marks it ``finished:failed`` with the reason and the app's process exits non-zero.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_sim.server_app import federation_size

from ..experiment import Experiment
from ..plan import ExperimentPlan
from ..run_folder import default_run_dir
from ..stopping import StopOnSignal

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    if "num-clients" not in grid.run.override_config:
        nodes = federation_size(grid)
        if not nodes:
            raise RuntimeError("no node connected to the run: start SuperNodes, or size the federation")
        print(f"num-clients = {nodes}: the nodes connected to this run (set num-clients in the run config to fix it)")
        config["num-clients"] = nodes
    plan = ExperimentPlan.from_mapping(config, engine="deployment")
    plan.check_data()
    if not plan.fed.out_dir:
        plan = plan.replace(out_dir=str(default_run_dir()))
    with StopOnSignal() as stopper:
        experiment = Experiment(plan, stop=stopper.event)
        experiment.serve(grid)
        experiment.finish()
    if experiment.failure:
        raise RuntimeError(experiment.failure)
