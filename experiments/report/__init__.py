"""Reports of run folders: the observer x attack table, figures, summary.md and one
self-contained report.html per run (``python -m experiments.report FOLDER``)."""
