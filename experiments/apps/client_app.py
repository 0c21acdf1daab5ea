"""The ClientApp a run uses: :mod:`fl_sim.client_app`'s, with the leakage audit's analysis
from the attack library (:class:`experiments.apps.probe.LeakageAuditor`) behind
:func:`fl_sim.mods.audit.make_audit_mod`. pyproject's ``clientapp`` names it; the audit does nothing
unless the run config sets ``audit``. ``secagg_app``: the SecAgg+ run's legacy client with the
same audit, before masking. ``imprint_app``: the app a malicious server ships with its bundle
for ``active-attack = "imprint-block"``: the same, except that it builds the imprint block in
front of the model when the weights it is sent carry one (:func:`attacks.imprint.load_model`);
an honest ClientApp refuses such weights."""

from fl_sim.client_app import make_client_app
from fl_sim.mods.audit import make_audit_mod
from fl_sim.secagg import make_secagg_client_app

from ..observe import with_imprint_block
from .probe import LeakageAuditor

app = make_client_app(make_audit_mod(LeakageAuditor()))
imprint_app = make_client_app(make_audit_mod(LeakageAuditor()), build=with_imprint_block)
imprint_secagg_app = make_secagg_client_app(LeakageAuditor(), build=with_imprint_block)
secagg_app = make_secagg_client_app(LeakageAuditor())  # the SecAgg+ observer's run (simulation only)
