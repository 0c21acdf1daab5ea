"""What every attack takes and returns.

An observer (the parameter server, a curious client, a server under secure aggregation) sees
the weights the client started from and an update. It may also know some facts about the
batch. Every attack in this package takes those as:

- ``model``: a plain ``nn.Module`` holding the weights the client started from;
- ``update``: an :class:`Update` (or a bare list of gradient tensors, one per parameter in
  ``model.parameters()`` order);
- ``input_shape``: the shape of one image, ``(C, H, W)``;
- ``threat``: a :class:`ThreatModel` saying what the attacker is granted;

and returns an :class:`AttackResult`.

Every attack is an :class:`Attack`: a class with a ``name``, typed ``Options`` (a frozen
:class:`AttackOptions` dataclass) and one call, ``attack(model, update, input_shape, threat,
*, seed=0, **options) -> AttackResult``, like an optimiser of ``torch.optim``: made with its
settings, then applied.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "Update",
    "ThreatModel",
    "AttackResult",
    "as_update",
    "check_gradients",
    "loss_kind",
    "training_loss",
    "num_outputs",
    "check_input_shape",
    "model_device",
    "AttackOptions",
    "Attack",
]

_Options = TypeVar("_Options", bound="AttackOptions")


@dataclass(frozen=True)
class Update:
    """An observed client update.

    ``kind="gradient"``: ``tensors`` are the loss gradient of one batch (FedSGD).
    ``kind="weight_delta"``: ``tensors`` are ``new_weights - sent_weights`` after
    ``local_steps`` SGD steps of learning rate ``lr`` (FedAvg).
    """

    tensors: tuple[Tensor, ...]
    kind: Literal["gradient", "weight_delta"] = "gradient"
    lr: float | None = None
    local_steps: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("gradient", "weight_delta"):
            raise ValueError(f"unknown update kind {self.kind!r}: use 'gradient' or 'weight_delta'")
        if self.kind == "weight_delta" and (self.lr is None or not self.lr > 0):
            raise ValueError("a weight_delta update needs the local learning rate lr > 0")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")

    def as_gradients(self) -> list[Tensor]:
        """The gradient this update stands for. For a weight delta of S steps this is the mean
        gradient over the steps, ``-delta / (lr * S)``: exact for one step, an approximation
        for more (attacks that can, replay the steps instead)."""
        if self.kind == "gradient":
            return [t for t in self.tensors]
        scale = -1.0 / (float(self.lr) * self.local_steps)
        return [t * scale for t in self.tensors]


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker is granted beyond the model and the update.

    ``labels``: the batch's labels if known (R-GAP's setting), else ``None``.
    ``batch_size``: the number of images in the update if known, else ``None`` (attacks that
    need it then assume 1). For a weight delta that is every distinct image the local steps
    used, not one step's batch.
    ``schedule``: for a weight delta, the local steps as the observer pictures them: per step,
    the indices (into the images to reconstruct, and into ``labels``) of that step's batch,
    in the order the steps ran. The server configured the learning rate, the number of steps
    and the batch size, so it knows the shape of the schedule; which image went into which
    step (the client's shuffle) only when granted. ``None``: every step used every image.
    ``bn_statistics``: for a model with BatchNorm trained in train mode, per BatchNorm layer
    (``model.modules()`` order) the batch's mean and unbiased variance of the layer's input, when
    the observer has them (from the client's BatchNorm buffers before and after the step:
    :func:`attacks.gradinversion.bn_batch_statistics`); ``None``: not granted.
    """

    labels: Tensor | None = None
    batch_size: int | None = None
    schedule: tuple[tuple[int, ...], ...] | None = None
    bn_statistics: tuple[tuple[Tensor, Tensor], ...] | None = None

    def __post_init__(self) -> None:
        if self.schedule is not None:
            if not self.schedule or any(not step for step in self.schedule):
                raise ValueError("a schedule needs at least one step, each with at least one image")
            used = sorted({i for step in self.schedule for i in step})
            if used != list(range(len(used))):
                raise ValueError("a schedule's indices must cover 0..N-1, the images to reconstruct")
            if self.labels is not None and torch.as_tensor(self.labels).numel() != len(used):
                raise ValueError(
                    f"the schedule uses {len(used)} images but {torch.as_tensor(self.labels).numel()} "
                    "labels are granted"
                )
            if self.batch_size is not None and self.batch_size != len(used):
                raise ValueError(f"the schedule uses {len(used)} images but the batch size is {self.batch_size}")

    def resolved_batch_size(self) -> int:
        if self.labels is not None:
            return int(torch.as_tensor(self.labels).numel())
        if self.batch_size is None and self.schedule is not None:
            return 1 + max(i for step in self.schedule for i in step)
        return int(self.batch_size or 1)


@dataclass
class AttackResult:
    """The outcome of one attack on one update.

    ``images``: reconstructions, ``(B, C, H, W)`` float32 on the CPU, clamped to [0, 1],
    whatever device the attack computed on (``diagnostics["device"]`` says which).
    ``labels``: recovered (or granted) labels, ``(B,)`` int64 on the CPU, or ``None``.
    ``history``: the objective per optimisation step (empty for analytic attacks).
    ``status``: ``"ok"``, or a short word for what went wrong (``"diverged"``, ...).
    ``diagnostics``: attack-specific facts, e.g. R-GAP's rank analysis, DLG's restarts.
    """

    attack: str
    images: Tensor
    labels: Tensor | None = None
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    status: str = "ok"
    diagnostics: dict[str, Any] = field(default_factory=dict)


def as_update(update: Update | Sequence[Tensor]) -> Update:
    """Accept a bare gradient list where an :class:`Update` is expected."""
    if isinstance(update, Update):
        return update
    if isinstance(update, Tensor) or not isinstance(update, Sequence):
        raise ValueError("update must be an Update or a list of gradient tensors, one per parameter")
    return Update(tensors=tuple(update))


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any). An attack
    computes where the model it is handed lives: the caller decides by placing the model."""
    return next(model.parameters(), torch.empty(0)).device


def check_gradients(model: nn.Module, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Check an observed update against ``model``: one finite tensor per parameter, in
    ``model.parameters()`` order, of the parameter's shape. Raises ``ValueError`` naming the
    parameter at fault; returns the tensors detached, on the model's device
    (:func:`model_device`)."""
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    device = model_device(model)
    if len(tensors) != len(params):
        raise ValueError(
            f"update has {len(tensors)} tensors but the model has {len(params)} parameters ({', '.join(names)})"
        )
    out = []
    for name, p, t in zip(names, params, tensors):
        t = torch.as_tensor(t)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"update for parameter {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"update for parameter {name!r} contains NaN or Inf")
        out.append(t.detach().to(device))
    return out


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def num_outputs(model: nn.Module) -> int:
    """The output width of the model's last linear layer (its class count, or 1 for a logit)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no linear layer: cannot tell its number of outputs")
    return linears[-1].out_features


def loss_kind(model: nn.Module) -> Literal["cross_entropy", "logistic"]:
    """The training loss the testbed uses with this model: a single output means R-GAP's
    logistic loss on a binary label; more outputs mean softmax cross-entropy."""
    return "logistic" if num_outputs(model) == 1 else "cross_entropy"


def training_loss(logits: Tensor, target: Tensor) -> Tensor:
    """The loss a client minimises, summed-then-averaged over the batch as PyTorch does.

    ``target`` is an int64 class index per sample, or (cross-entropy only) a row of
    probabilities per sample (a soft label, as DLG optimises). For one output the target is
    a binary label in {0, 1} and the loss is the logistic loss ``log(1 + exp(-y' z))`` with
    ``y' = 2y - 1``.
    """
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), target.to(logits.dtype))
    return F.cross_entropy(logits, target)


# read-only: the dtypes an option may name
_DTYPES = types.MappingProxyType(
    {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the annotated type ``hint`` (int, float, bool, str, Literal, torch.dtype,
    tuples and ``X | None``), or ``ValueError`` naming the option. Lenient only where no
    information is lost: an int for a float, an integral float for an int, a list for a
    tuple, a dtype's name (``"float32"``) for a dtype."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, arg, value)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"option {name}: {value!r} is not a {hint}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"option {name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"option {name} must be a tuple, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(name, args[0], v) for v in value)
        if len(args) != len(value):
            raise ValueError(f"option {name} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(name, a, v) for a, v in zip(args, value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"option {name} must be True or False, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"option {name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"option {name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"option {name} must be a string, got {value!r}")
        return value
    if hint is torch.dtype:
        if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
            return _DTYPES[value.removeprefix("torch.")]
        if not isinstance(value, torch.dtype):
            raise ValueError(f"option {name} must be a torch dtype (e.g. 'float64'), got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class AttackOptions:
    """The base of an attack's options: a frozen dataclass whose fields are the settings,
    each with its type and default. Values are coerced to the annotated types and checked
    once, when the object is made (subclasses add their own checks in ``_check``); a preset,
    such as a paper's setting, is an instance. ``override`` applies keyword overrides, with
    a one-line error for a key that is not a field."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        self._check()

    def _check(self) -> None:
        """Checks across fields or of ranges; raise ``ValueError`` naming the option."""

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    def override(self: _Options, overrides: Mapping[str, Any], *, attack: str = "the attack") -> _Options:
        """A copy with ``overrides`` applied (validated like a new instance)."""
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise ValueError(f"{attack} has no option {', '.join(unknown)} (options: {', '.join(self.names())})")
        return dataclasses.replace(self, **overrides) if overrides else self


# The keywords of an attack's call besides its options: no option may take these names.
_CALL_KEYWORDS = frozenset({"seed", "options"})


class Attack(abc.ABC):
    """A gradient-inversion attack: from one observed update to a reconstruction.

    A subclass sets ``name`` (its key in :data:`attacks.ATTACKS` or :data:`attacks.ACTIVE`),
    ``Options`` (its settings: a frozen :class:`AttackOptions` dataclass, whose defaults are the
    attack's defaults) and implements :meth:`_reconstruct`; its docstring says the threat model
    and the paper's setting. An instance holds its options, validated once when it is made::

        attack = DLG(max_steps=100)          # = DLG(DLGOptions(max_steps=100)) = get_attack("dlg", max_steps=100)
        result = attack(model, update, input_shape, threat, seed=0)
        result = attack(model, update, input_shape, threat, seed=0, tol=0.0)  # an option for this call only

    Calling an instance is the calling convention every attack shares (the module-level
    functions :func:`attacks.dlg.dlg`, ... are the same call on a fresh instance). An attack
    keeps nothing from one call to the next that changes its result; one that caches what
    depends on the weights alone (:class:`attacks.rgap.RGAP`) says so.
    """

    name: ClassVar[str]
    Options: ClassVar[type[AttackOptions]] = AttackOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        opts = cls.Options
        if not (isinstance(opts, type) and issubclass(opts, AttackOptions) and opts.__dataclass_params__.frozen):
            raise TypeError(f"{cls.__name__}.Options must be a frozen dataclass deriving from AttackOptions")
        clash = sorted(_CALL_KEYWORDS.intersection(opts.names()))
        if clash:
            raise TypeError(f"{cls.__name__}.Options may not have a field named {', '.join(clash)}: the call takes it")
        if "name" in vars(cls) and not (isinstance(cls.name, str) and cls.name):
            raise TypeError(f"{cls.__name__}.name must be a non-empty string")

    def __init__(self, options: AttackOptions | None = None, **overrides: Any) -> None:
        """``options``: an instance of :attr:`Options` (None: its defaults; a preset such as
        :data:`attacks.dlg.FAITHFUL` is one); ``overrides``: its fields by keyword, applied on
        top. An unknown field or a bad value raises a one-line ``ValueError`` naming it."""
        self.options = self._resolve(options, overrides)
        # what inspect.signature (help(), a caller checking keywords) reports for the call:
        # the shared arguments, then every option by name with its value on this instance
        call = inspect.signature(Attack.__call__)
        shared = [p for p in list(call.parameters.values())[1:] if p.kind is not p.VAR_KEYWORD]
        named = [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=getattr(self.options, f.name), annotation=f.type
            )
            for f in dataclasses.fields(self.options)
        ]
        self.__signature__ = call.replace(parameters=shared + named)

    def _resolve(self, options: AttackOptions | None, overrides: Mapping[str, Any]) -> AttackOptions:
        if options is None:
            options = self.Options()
        elif not isinstance(options, self.Options):
            raise ValueError(f"options must be a {self.Options.__name__}, got {type(options).__name__}")
        return options.override(overrides, attack=self.name)

    def __call__(
        self,
        model: nn.Module,
        update: Update | Sequence[Tensor],
        input_shape: Sequence[int],
        threat: ThreatModel = ThreatModel(),
        *,
        seed: int = 0,
        options: AttackOptions | None = None,
        **overrides: Any,
    ) -> AttackResult:
        """Reconstruct the batch behind ``update``, an update of ``model`` (the weights the
        client started from), for images of ``input_shape`` ``(C, H, W)``, granted what
        ``threat`` says. ``seed`` seeds the attack's own randomness (the same seed, the same
        result). ``options`` replaces the attack's options for this call and ``overrides``
        apply on top, validated as in the constructor."""
        opts = self._resolve(self.options if options is None else options, overrides)
        return self._reconstruct(model, update, input_shape, threat, seed=seed, options=opts)

    @abc.abstractmethod
    def _reconstruct(
        self,
        model: nn.Module,
        update: Update | Sequence[Tensor],
        input_shape: Sequence[int],
        threat: ThreatModel,
        *,
        seed: int,
        options: Any,
    ) -> AttackResult:
        """The attack itself, with its options resolved (an instance of :attr:`Options`)."""

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self.options, f.name)!r}"
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != f.default
        ]
        return f"{type(self).__name__}({', '.join(changed)})"
