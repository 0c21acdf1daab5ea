"""The ClientApp a run uses: :mod:`fl_sim.client_app`'s, with the leakage audit's analysis
from the attack library (:class:`experiments.audit.LeakageAuditor`) behind
:func:`fl_sim.audit.make_audit_mod`. pyproject's ``clientapp`` names it; the audit does nothing
unless the run config sets ``audit``. ``secagg_app``: the SecAgg+ run's legacy client with the
same audit, before masking. ``imprint_app``: the app a malicious server ships with its bundle
for ``active-attack = "imprint-block"``: the same, except that it builds the imprint block in
front of the model when the weights it is sent carry one (:func:`attacks.imprint.load_model`);
an honest ClientApp refuses such weights."""

from typing import Mapping

from fl_sim.audit import make_audit_mod
from fl_sim.config import RunConfig
from fl_sim.client_app import make_client_app
from fl_sim.secagg import make_secagg_client_app

from .audit import LeakageAuditor


def with_imprint_block(cfg: RunConfig, state):
    """The dataset and the run's model holding ``state`` (a state dict, or SecAgg+'s arrays in
    order), with the imprint block in front when the server sent one: what the server's
    ClientApp builds, and what its attack reads the update with."""
    from attacks.imprint import BLOCK_KEYS, load_model
    from fl_sim.data import load_dataset
    from fl_sim.models import build_model

    data = load_dataset(cfg.dataset, cfg.data_root)
    base = build_model(cfg.model, data.input_shape, data.num_classes)
    if not isinstance(state, Mapping):  # unnamed arrays: the block's three come first when they are there
        keys = list(base.state_dict())
        keys = ([*BLOCK_KEYS, *(f"1.{k}" for k in keys)] if len(state) == len(keys) + len(BLOCK_KEYS) else keys)
        state = dict(zip(keys, state))
    return data, load_model(base, state, data.input_shape)


app = make_client_app(make_audit_mod(LeakageAuditor()))
imprint_app = make_client_app(make_audit_mod(LeakageAuditor()), build=with_imprint_block)
imprint_secagg_app = make_secagg_client_app(LeakageAuditor(), build=with_imprint_block)
secagg_app = make_secagg_client_app(LeakageAuditor())  # the SecAgg+ observer's run (simulation only)
