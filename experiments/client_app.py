"""The ClientApp a run uses: :mod:`fl_sim.client_app`'s, with the leakage audit's analysis
from the attack library (:class:`experiments.audit.LeakageAuditor`) behind
:func:`fl_sim.audit.make_audit_mod`. pyproject's ``clientapp`` names it; the audit does nothing
unless the run config sets ``audit``. ``secagg_app``: the SecAgg+ run's legacy client with the
same audit, before masking."""

from fl_sim.audit import make_audit_mod
from fl_sim.client_app import make_client_app
from fl_sim.secagg import make_secagg_client_app

from .audit import LeakageAuditor

app = make_client_app(make_audit_mod(LeakageAuditor()))
secagg_app = make_secagg_client_app(LeakageAuditor())  # the SecAgg+ observer's run (simulation only)
