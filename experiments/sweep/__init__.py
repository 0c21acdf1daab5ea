"""Sweeps: what stops each attack, for which observer, and what that costs in accuracy.

    python -m experiments.sweep dlg-defences          # a preset (experiments/sweep/presets/*.toml)
    python -m experiments.sweep my-grid.toml --jobs 2 # a grid of your own
    python -m experiments.sweep dp --out sweeps/dp    # again with the same folder: resumes
    python -m experiments.sweep smoke --ray-address HEAD:6379   # each run a Ray task on a cluster

The rooms: :mod:`.spec` (a SPEC file and its cells), :mod:`.runner` (running the cells' runs,
resuming, stopping), :mod:`.cluster` (where the runs run: local processes or Ray tasks),
:mod:`.tables` (cells.csv, results.csv, figures, summary.md) and :mod:`.page` (report.html).
See :mod:`.spec` for the SPEC format and the sweep folder.
"""
