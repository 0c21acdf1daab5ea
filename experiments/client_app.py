"""The ClientApp a run uses: :mod:`fl_sim.client_app`'s, with the leakage audit's analysis
from the attack library (:class:`experiments.audit.LeakageAuditor`) behind
:func:`fl_sim.audit.make_audit_mod`. pyproject's ``clientapp`` names it; the audit does nothing
unless the run config sets ``audit``."""

from fl_sim.audit import make_audit_mod
from fl_sim.client_app import make_client_app

from .audit import LeakageAuditor

app = make_client_app(make_audit_mod(LeakageAuditor()))
