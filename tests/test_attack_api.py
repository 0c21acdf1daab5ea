"""The one attack interface (attacks.base.Attack) and its registries, on a tiny model."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

import attacks
from attacks import ACTIVE, ATTACKS, Attack, AttackOptions, AttackResult, ThreatModel, get_attack, training_loss
from attacks.dlg import FAITHFUL, DLGOptions, dlg
from attacks.idlg import idlg
from attacks.imprint import imprint
from attacks.inverting import inverting_gradients
from attacks.rgap import rgap
from attacks.trap import trap

SHAPE = (1, 6, 6)
# a few iterations each: the interface is under test here, not the attacks' quality
QUICK = {
    "dlg": dict(max_steps=2, max_iter=4, max_restarts=0),
    "idlg": dict(max_steps=2, max_iter=4, max_restarts=0),
    "ig": dict(max_steps=3, refine_steps=1, refine_iter=2),
    "fedavg-sim": dict(max_steps=3),
    "gradinversion": dict(groups=2, max_steps=2, max_iter=3, group_rounds=1, round_steps=1),
    "rgap": dict(rank=False),
    "imprint": {},
    "imprint-block": {},
    "trap": dict(levels=0),  # these random images are not on 8-bit levels
}
FUNCTIONS = {"dlg": dlg, "idlg": idlg, "ig": inverting_gradients, "rgap": rgap, "imprint": imprint, "trap": trap}
REGISTERED = {**ATTACKS, **ACTIVE}


def _tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 36, 3))


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [g.detach() for g in torch.autograd.grad(training_loss(model(x), y), list(model.parameters()))]


def _observation(name: str) -> tuple[nn.Module, list[torch.Tensor], int]:
    """A model, the gradient of a batch on it, and the batch size the attack should return."""
    if name in ACTIVE:  # an update of the model the active server built
        torch.manual_seed(0)
        base = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))
        model = ACTIVE[name].construct(base, SHAPE, _images(50, seed=7), 8, seed=0, images=2)
        x = _images(2)
        return model, _gradient(model, x, torch.tensor([0, 2])), 0
    model = _tiny_model()
    x = _images(1)
    return model, _gradient(model, x, torch.tensor([2])), 1


@pytest.mark.parametrize("name", list(REGISTERED))
def test_registered_attack_has_the_interface(name):
    cls = REGISTERED[name]
    assert isinstance(cls, type) and issubclass(cls, Attack) and cls.name == name
    assert cls.__doc__ and "Threat model" in cls.__doc__ + (cls.__mro__[1].__doc__ or "")
    assert issubclass(cls.Options, AttackOptions) and dataclasses.is_dataclass(cls.Options)
    defaults = cls.Options()  # every field has a default
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(defaults, cls.Options.names()[0], None)
    assert cls().options == defaults and get_attack(name).options == defaults
    # the call lists the options as keywords, as the functions' signatures did
    keywords = {n for n, p in inspect.signature(cls()).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert keywords == {"seed", "options", *cls.Options.names()}


@pytest.mark.parametrize("name", list(REGISTERED))
def test_unknown_option_is_a_one_line_value_error_naming_it(name):
    model, grads, _ = _observation(name)
    for make in (
        lambda: REGISTERED[name](no_such_option=1),
        lambda: get_attack(name, no_such_option=1),
        lambda: get_attack(name)(model, grads, SHAPE, no_such_option=1),
    ):
        with pytest.raises(ValueError) as info:
            make()
        message = str(info.value)
        assert f"{name} has no option no_such_option" in message and "\n" not in message
    with pytest.raises(ValueError, match=f"must be a {REGISTERED[name].Options.__name__}"):
        REGISTERED[name](options={"a": 1})


@pytest.mark.parametrize("name", list(REGISTERED))
def test_reconstructs_a_tiny_update_the_same_way_through_every_door(name):
    model, grads, batch = _observation(name)
    threat = ThreatModel(batch_size=batch) if batch else ThreatModel()
    res = get_attack(name)(model, grads, SHAPE, threat, seed=3, **QUICK[name])
    assert isinstance(res, AttackResult)
    assert res.images.dtype == torch.float32 and tuple(res.images.shape[1:]) == SHAPE
    assert res.images.shape[0] == (batch or 2)  # the imprint and the trap: both images, each alone in a unit
    assert 0.0 <= float(res.images.min()) and float(res.images.max()) <= 1.0
    others = [
        REGISTERED[name](**QUICK[name])(model, grads, SHAPE, threat, seed=3),
        REGISTERED[name](REGISTERED[name].Options(**QUICK[name]))(model, grads, SHAPE, threat, seed=3),
    ]
    if name in FUNCTIONS:
        others.append(FUNCTIONS[name](model, grads, SHAPE, threat, seed=3, **QUICK[name]))
    for other in others:
        assert torch.equal(other.images, res.images) and other.history == res.history
        assert (other.labels is None and res.labels is None) or torch.equal(other.labels, res.labels)
        assert (other.attack, other.status, other.steps) == (res.attack, res.status, res.steps)


def test_options_for_one_call_leave_the_instance_alone():
    model, grads, _ = _observation("dlg")
    attack = get_attack("dlg", max_steps=3, max_iter=2, max_restarts=0)
    once = attack(model, grads, SHAPE, seed=0, max_steps=1)
    assert once.steps == 1 and attack.options.max_steps == 3
    preset = attack(model, grads, SHAPE, seed=0, options=FAITHFUL, max_steps=1, max_iter=2)  # a whole options object
    assert preset.diagnostics["optimizer"] == "torch" and attack.options.optimizer == "compact"
    assert repr(attack) == "DLG(max_steps=3, max_iter=2, max_restarts=0)"


def test_unknown_attack_is_a_one_line_value_error_listing_the_names():
    with pytest.raises(ValueError) as info:
        get_attack("nope")
    message = str(info.value)
    assert "'nope'" in message and "\n" not in message
    assert all(name in message for name in REGISTERED)


def test_registries_hold_the_classes():
    assert list(ATTACKS) == ["dlg", "idlg", "rgap", "ig", "gradinversion", "fedavg-sim"]
    assert list(ACTIVE) == ["imprint", "imprint-block", "trap"]
    assert ATTACKS["dlg"].Options is DLGOptions and ATTACKS["idlg"].Options is DLGOptions
    assert ATTACKS["dlg"].Options.names()[:2] == ["max_steps", "max_iter"]


def test_a_subclass_with_bad_options_is_refused_when_defined():
    with pytest.raises(TypeError, match="frozen dataclass"):
        type("Bad", (Attack,), {"name": "bad", "Options": dict, "_reconstruct": lambda *a, **k: None})

    @dataclasses.dataclass(frozen=True)
    class Clash(AttackOptions):
        seed: int = 0

    with pytest.raises(TypeError, match="seed"):
        type("Bad", (Attack,), {"name": "bad", "Options": Clash, "_reconstruct": lambda *a, **k: None})


# --------------------------------------------------------------------------- the package's shape

PACKAGE = Path(attacks.__file__).parent


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """The attacks modules a module imports at its top level, and every import nested in a
    function or class (``file:line``) but an optional third-party dependency's whose line
    says so (``# optional ...``: the package may be absent, e.g. LPIPS)."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    local, nested = set(), []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            local.add(node.module or "")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attacks."):
            local.add(node.module.split(".", 1)[1])
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nested += [
                f"{path.name}:{n.lineno}"
                for n in ast.walk(node)
                if isinstance(n, (ast.Import, ast.ImportFrom))
                and not (
                    isinstance(n, ast.Import)
                    and n.names[0].name.split(".")[0] not in ("attacks", "torch", "numpy", "scipy")
                    and "# optional" in lines[n.lineno - 1]
                )
            ]
    return local, nested


def test_no_flower_no_nested_imports_and_no_import_cycle():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] in ("flwr", "flower")], name
        graph[name], nested = _imports(path)
        assert nested == [], f"imports inside a function: {nested}"
    # depth-first search for a cycle among the modules (the package's __init__ imports them all)
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in graph.get(name, ()):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [name, dep])}"
            if dep not in state:
                visit(dep, path + [name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_attack_modules_keep_no_mutable_state():
    for name in (
        "base",
        "_gradient_matching",
        "dlg",
        "idlg",
        "rgap",
        "inverting",
        "imprint",
        "lbfgs",
        "metrics",
        "fedavg",
    ):
        module = __import__(f"attacks.{name}", fromlist=["_"])
        mutable = [
            k for k, v in vars(module).items() if not k.startswith("__") and isinstance(v, (dict, list, set, bytearray))
        ]
        assert mutable == [], (name, mutable)
