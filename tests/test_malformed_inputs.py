"""Malformed inputs for every public callable (issue 13): hypothesis draws a batch, and every
malformation that applies to a callable's arguments is tried on it.

The outcome must be either

- a ``ValueError`` whose message names the offending argument or key (and, for a wrong shape or
  dtype, says what came: the shape or the dtype), or
- for an input that is legitimately accepted (a 0/1 float or integer mask, an integer where a
  float is fine, garbage in the padding, ``None`` for an optional argument), a finite result equal
  to that of the canonical input.

Malformations: wrong dtype (int / bool / complex where float is expected, a mask with values other
than 0/1), wrong rank or shape ([N, T, 1], [N] for [N, T], a scalar, N or T off by one, N = 0,
T = 0), non-tensor values (a list, a string, ``None``), NaN / ±inf at a valid position (an error
with validation on) and garbage in the padding (inert), out-of-range hyper-parameters (negative,
NaN, ±inf, ``"0.2"``, ``True``), unknown or absent keys in ``in_keys`` overrides, and missing keys.

``SPECS`` says how to call each name; ``test_specs_cover_every_public_callable`` fails, listing
them, when a public name has no entry (so a new public name must be added here to be covered).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from strategies import GARBAGE
from tensordict import NonTensorStack, TensorDict, TensorDictBase

import gspo_components as gc
from gspo_components.fused import linear_log_probs
from gspo_components.rollout import rewards as rw
from gspo_components.rollout.scoring import response_log_probs
from gspo_components.testing.tiny import build_tiny_qwen3

# -- outcomes --------------------------------------------------------------------------------------

RAISE = "raise"  # ValueError naming the argument (and the fragments given)
EQUAL = "equal"  # accepted: the canonical input's result
FINITE = "finite"  # accepted: a finite result
RAISE_OR_FINITE = "raise-or-finite"  # either is right (e.g. an empty batch)
RAISE_OR_EQUAL = "raise-or-equal"
PASSES_ON = "raise-or-passes-on"  # NaN in, NaN out is allowed (see Spec.non_finite_passes)
SKIP = object()  # a malformation that does not apply to this draw
ANY_NAME = "<any input>"

MODULE_SETTINGS = settings(settings.default, max_examples=max(2, settings.default.max_examples // 30))


@dataclass
class Ctx:
    n: int
    t: int
    mask: torch.Tensor  # bool [N, T]
    row: int  # a row with a valid token
    col: int  # a valid column of that row
    garbage: float
    td_mode: bool  # inputs travel in a TensorDict (its batch size fixes N; no lists)


def _valid_pos(x: torch.Tensor, ctx: Ctx) -> tuple[int, ...]:
    return (ctx.row, ctx.col) if x.dim() == 2 else (ctx.row,)


def _put(x: object, ctx: Ctx, value: float) -> object:
    if not isinstance(x, torch.Tensor):
        return SKIP
    y = x.clone()
    y[_valid_pos(y, ctx)] = value
    return y


def _pad_garbage(x: object, ctx: Ctx) -> object:
    if not isinstance(x, torch.Tensor) or x.shape != ctx.mask.shape or not x.is_floating_point():
        return SKIP
    if bool(ctx.mask.all()):
        return SKIP
    return torch.where(ctx.mask, x, torch.full_like(x, ctx.garbage))


def _shape(s: torch.Size | tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def _wrong_t(x: object, ctx: Ctx) -> object:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        return SKIP
    return torch.cat([x, x[:, :1]], dim=1)


def _wrong_n(x: object, ctx: Ctx) -> object:
    if ctx.td_mode or not isinstance(x, torch.Tensor):
        return SKIP
    return torch.cat([x, x[:1]], dim=0)


def _fn_only(f: Callable[[Any, Ctx], object]) -> Callable[[Any, Ctx], object]:
    return lambda x, ctx: SKIP if ctx.td_mode else f(x, ctx)


# A malformation: (kind, transform(value, ctx) -> new value | SKIP | None, outcome, fragments(new)).
Malformation = tuple[str, Callable[[Any, Ctx], object], str, Callable[[Any], tuple[str, ...]]]


def _frag_dtype(y: object) -> tuple[str, ...]:
    return (str(y.dtype).replace("torch.", ""),) if isinstance(y, torch.Tensor) else ()


def _frag_shape(y: object) -> tuple[str, ...]:
    return (_shape(y.shape),) if isinstance(y, torch.Tensor) else ()


def _frag_type(y: object) -> tuple[str, ...]:
    return (type(y).__name__,)


def _none(y: object) -> tuple[str, ...]:
    return ()


COMMON: list[Malformation] = [
    ("complex", lambda x, c: x.to(torch.complex64), RAISE, _frag_dtype),
    ("extra-dim", lambda x, c: x.unsqueeze(-1) if x.dim() == 2 else x.reshape(-1, 1, 1), RAISE, _frag_shape),
    ("T+1", _wrong_t, RAISE, _frag_shape),
    ("N+1", _wrong_n, RAISE, _frag_shape),
    ("scalar", _fn_only(lambda x, c: x.sum()), RAISE, _frag_shape),
    ("list", _fn_only(lambda x, c: x.tolist()), RAISE, _frag_type),
    ("string", lambda x, c: "0.5", RAISE, _none),
]
FLOAT: list[Malformation] = [
    *COMMON,
    ("int64", lambda x, c: x.round().long(), RAISE, _frag_dtype),
    ("bool", lambda x, c: x > 0, RAISE, _frag_dtype),
    ("nan-valid", lambda x, c: _put(x, c, math.nan), RAISE, _none),
    ("+inf-valid", lambda x, c: _put(x, c, math.inf), RAISE, _none),
    ("-inf-valid", lambda x, c: _put(x, c, -math.inf), RAISE, _none),
    ("garbage-padding", _pad_garbage, EQUAL, _none),
]
FLOAT_TOKEN: list[Malformation] = [
    *FLOAT,
    ("rank-1", lambda x, c: x[:, 0], RAISE, _frag_shape),
]
FLOAT_SEQ: list[Malformation] = [
    *FLOAT,
    ("[N, 2]", lambda x, c: x.unsqueeze(-1).expand(-1, 2), RAISE, _frag_shape),
]
MASK: list[Malformation] = [
    *COMMON,
    ("rank-1", lambda x, c: x[:, 0], RAISE, _frag_shape),
    ("float-0/1", lambda x, c: x.double(), EQUAL, _none),
    ("int-0/1", lambda x, c: x.long(), EQUAL, _none),
    (
        "float-0.5",
        lambda x, c: torch.where(x, 1.0, 0.0).index_put_(
            (torch.tensor(c.row), torch.tensor(c.col)), torch.tensor(0.5)
        ),
        RAISE,
        lambda y: ("0 and 1",),
    ),
    ("int-2", lambda x, c: x.long() * 2, RAISE, lambda y: ("0 and 1",)),
    ("all-false", lambda x, c: torch.zeros_like(x), RAISE_OR_FINITE, _none),
]
BOOL_SEQ: list[Malformation] = [
    *COMMON,
    ("float-0/1", lambda x, c: x.double(), RAISE_OR_EQUAL, _none),
    ("float-0.5", lambda x, c: torch.full(x.shape, 0.5, dtype=torch.float64), RAISE, _none),
]
INT: list[Malformation] = [
    *COMMON,
    ("float", lambda x, c: x.double() + 0.5, RAISE, _frag_dtype),
    ("integral-float", lambda x, c: x.double(), RAISE_OR_EQUAL, _none),
]
ROLES: dict[str, list[Malformation]] = {
    "float_token": FLOAT_TOKEN,
    "float_seq": FLOAT_SEQ,
    "adv": FLOAT,  # [N] or [N, T]
    "mask": MASK,
    "bool_seq": BOOL_SEQ,
    "bool_token": [*COMMON, ("float-0.5", lambda x, c: torch.full(x.shape, 0.5), RAISE, _none)],
    "int_seq": INT,
    "int_token": INT,
    # the Objective's token_loss may be one loss per response ([N], the per-response slot)
    "token_loss": [m for m in FLOAT_TOKEN if m[0] != "rank-1"],
    "mask_alone": [m for m in MASK if m[0] != "T+1"],  # a mask alone may have any width
    "column": [("string", lambda x, c: "0.5", RAISE_OR_FINITE, _none)],  # broadcast to every row
}


@dataclass(frozen=True)
class HP:
    """A hyper-parameter: a valid value; an integral valid value (int and float must agree);
    whether negatives and ``None`` are valid; the choices of a categorical one; integer-only."""

    valid: object
    int_value: int | None = None
    negative_ok: bool = False
    optional: bool = False
    choices: tuple[object, ...] | None = None
    integer: bool = False


def hp_malformations(hp: HP) -> list[tuple[str, object, str]]:
    """(kind, value, outcome)."""
    if hp.choices is not None:
        out = [("bogus-choice", "bogus", RAISE), ("int-choice", 3, RAISE)]
        if not hp.optional:
            out.append(("none", None, RAISE))
        return out
    out = [
        ("nan", math.nan, RAISE),
        ("+inf", math.inf, RAISE),
        ("-inf", -math.inf, RAISE),
        ("string", "0.2", RAISE),
        ("bool", True, RAISE),
        ("negative", -0.5 if not hp.integer else -3, RAISE_OR_FINITE if hp.negative_ok else RAISE),
        ("none", None, FINITE if hp.optional else RAISE),
    ]
    if hp.integer:
        out.append(("fraction", 2.5, RAISE))
    return out


@dataclass
class Spec:
    """How to call one public name.

    ``call(tensors, hypers, objects)`` runs it; ``tensors`` maps an argument (or TensorDict key)
    to (batch entry, role, required); ``hypers`` and ``objects`` are the other arguments with
    their valid values (``objects``: builder(batch) -> value, and bad values that must raise).
    """

    call: Callable[[dict[str, object], dict[str, object], dict[str, object]], object]
    tensors: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    hypers: dict[str, HP] = field(default_factory=dict)
    objects: dict[str, tuple[Callable[[dict[str, torch.Tensor]], object], tuple[object, ...]]] = field(
        default_factory=dict
    )
    td_mode: bool = False
    keyed: Callable[..., object] | None = None  # a constructor taking in_keys=: overrides are drawn
    required_in: tuple[str, ...] = ()
    non_finite_passes: tuple[str, ...] = ()  # inputs whose NaN/±inf at valid positions is passed on
    empty_n: bool = True  # N = 0 is tried


# -- the batch -------------------------------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], Ctx]:
    n = draw(st.integers(2, 5))
    t = draw(st.integers(2, 6))
    lengths = draw(st.lists(st.integers(1, t), min_size=n, max_size=n))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    row = draw(st.integers(0, n - 1))
    col = draw(st.integers(0, lengths[row] - 1))

    def r(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    lp = -r(n, t) * 2 - 0.01
    old = lp - 0.2 * (r(n, t) - 0.5)
    b = {
        "log_probs": lp,
        "old_log_probs": old,
        "ref_log_probs": lp + 0.1 * (r(n, t) - 0.5),
        "rollout_log_probs": old + 0.1 * (r(n, t) - 0.5),
        "entropy": r(n, t) * 2,
        "token_advantages": r(n, t) * 2 - 1,
        "log_ratio": torch.where(mask, lp - old, 0.0),
        "token_loss": r(n, t) * 2 - 1,
        "is_weights": r(n, t) + 0.5,
        "advantages": r(n) * 2 - 1,
        "rewards": torch.where(r(n) < 0.5, 1.0, 0.0) + r(n) * 0.1,
        "hidden": r(n, 8) - 0.5,
        "weight": r(11, 8) - 0.5,
        "bias": r(11) - 0.5,
    }
    b = {k: v.to(dtype) for k, v in b.items()}
    b["response_mask"] = mask
    b["clipped"] = (r(n, t) < 0.3) & mask
    b["reward_valid"] = torch.ones(n, dtype=torch.bool)
    b["group_ids"] = torch.arange(n) // 2
    b["response_ids"] = (r(n, t) * 5).long()
    b["targets"] = (r(n) * 11).long()
    b["lengths"] = mask.sum(-1)
    b["response_text"] = NonTensorStack(*[f"<answer>{i % 3}</answer>" for i in range(n)])
    b["answer"] = NonTensorStack(*[str(i % 2) for i in range(n)])
    b["data_index"] = torch.arange(n) % 4
    garbage = draw(st.sampled_from(GARBAGE))
    return b, Ctx(n, t, mask, row, col, garbage, td_mode=False)


# -- results ---------------------------------------------------------------------------------------


def leaves(result: object) -> list[torch.Tensor]:
    """The tensors (and numbers) of a result, in a fixed order."""
    if isinstance(result, torch.Tensor):
        return [result.detach()]
    if isinstance(result, TensorDictBase):
        keys = sorted(result.keys(include_nested=True, leaves_only=True), key=str)
        return [t for k in keys for t in leaves(result.get(k))]
    if isinstance(result, dict):
        return [t for k in sorted(result, key=str) for t in leaves(result[k])]
    if isinstance(result, tuple | list):
        return [t for x in result for t in leaves(x)]
    if is_dataclass(result):
        return [t for f in fields(result) for t in leaves(getattr(result, f.name))]
    if isinstance(result, bool | int | float):
        return [torch.tensor(float(result))]
    return []


def is_finite(result: object) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in leaves(result) if t.dtype.is_floating_point)


def same(a: object, b: object) -> bool:
    la, lb = leaves(a), leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        if x.shape != y.shape:
            return False
        if not torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6, equal_nan=True):
            return False
    return True


def run(thunk: Callable[[], object]) -> object:
    try:
        return thunk()
    except ValueError as error:
        return error


def judge(label: str, outcome: object, expect: str, names: tuple[str, ...], frags: tuple[str, ...],
          canonical: object) -> str | None:  # fmt: skip
    """None if right, else what was wrong."""
    if isinstance(outcome, ValueError):
        message = str(outcome)
        if expect in (EQUAL, FINITE):
            return f"{label}: expected acceptance, got ValueError: {message}"
        if ANY_NAME not in names and not any(n in message for n in names):
            return f"{label}: ValueError does not name {names}: {message}"
        missing = [f for f in frags if f not in message]
        if expect == RAISE and missing:
            return f"{label}: ValueError lacks {missing}: {message}"
        return None
    if expect == RAISE and isinstance(outcome, TensorDictBase) and "reward_valid" in outcome.keys():
        if not bool(outcome["reward_valid"].any()):
            return None  # a RewardFn refuses per sample: every sample failed, none is a valid reward
    if expect == RAISE:
        return f"{label}: expected a ValueError naming {names}, got a result"
    if expect == PASSES_ON:
        return None
    if not is_finite(outcome):
        return f"{label}: result is not finite: {leaves(outcome)}"
    if expect in (EQUAL, RAISE_OR_EQUAL) and not same(outcome, canonical):
        return f"{label}: result differs from the canonical input's: {leaves(outcome)} vs {leaves(canonical)}"
    return None


# Names a message may use instead: a recipe's advantage_eps is its GroupNormalizedAdvantage's eps
# (the message names that part and "eps"; see the report on recipes.py), WeightedSum names the term.
# The micro-batches of step_normalizers are masks, named by mask_key; an entropy_coef != 0 needs an
# entropy entry, which the message names.
ALIASES = {
    "advantage_eps": ("eps",),
    "terms": ("term",),
    "filters": ("filter",),
    "entropy_coef": ("entropy",),
    "micro_batches": ("response_mask",),
}


def check_spec(spec: Spec, batch: dict[str, torch.Tensor], ctx: Ctx) -> list[str]:
    """Every malformation of every argument of ``spec``; the list of failures."""
    ctx.td_mode = spec.td_mode
    tensors = {arg: batch[src] for arg, (src, _, _) in spec.tensors.items()}
    hypers = {name: hp.valid for name, hp in spec.hypers.items()}
    objects = {name: build(batch) for name, (build, _) in spec.objects.items()}
    canonical = spec.call(tensors, hypers, objects)  # must run
    assert is_finite(canonical), f"the canonical call is not finite: {leaves(canonical)}"
    failures: list[str] = []

    def attempt(label: str, expect: str, names: tuple[str, ...], frags: tuple[str, ...], t=tensors, h=hypers,
                o=objects, ref=canonical) -> None:  # fmt: skip
        outcome = run(lambda: spec.call(t, h, o))
        problem = judge(label, outcome, expect, names, frags, ref)
        if problem is not None:
            failures.append(problem)

    for arg, (_, role, required) in spec.tensors.items():
        for kind, transform, expect, frags in ROLES[role]:
            new = transform(tensors[arg], ctx)
            if new is SKIP:
                continue
            if expect == RAISE and kind.endswith("-valid") and arg in spec.non_finite_passes:
                expect = PASSES_ON
            names = (arg, *ALIASES.get(arg, ()), *(("selects no token",) if kind == "all-false" else ()))
            if kind == "all-false" and arg in spec.non_finite_passes:
                expect = PASSES_ON
            if kind in ("T+1", "N+1") and len(spec.tensors) == 1:
                expect = RAISE_OR_FINITE  # a lone tensor has no other to disagree with
            attempt(f"{arg}={kind}", expect, names, frags(new), t={**tensors, arg: new})
        absent = FINITE if not required else RAISE
        if spec.td_mode or not required:  # a plain call without a required argument is Python's TypeError
            attempt(f"{arg}=absent", absent, (arg,), (), t={k: v for k, v in tensors.items() if k != arg})
        if not spec.td_mode:
            attempt(f"{arg}=None", absent, (arg,), (), t={**tensors, arg: None})
    # all tensors at once: garbage in every padding slot is inert, N = 0 and T = 0
    padded = {k: (_pad_garbage(v, ctx) if spec.tensors[k][1] != "mask" else v) for k, v in tensors.items()}
    padded = {k: (tensors[k] if v is SKIP else v) for k, v in padded.items()}
    if any(v is not tensors[k] for k, v in padded.items()):
        attempt("all padding garbage", EQUAL, (ANY_NAME,), (), t=padded)
    if tensors and all(isinstance(v, torch.Tensor) for v in tensors.values()):
        empty_n = {k: v[:0] for k, v in tensors.items()}
        if spec.empty_n:
            attempt("N=0", RAISE_OR_FINITE, (ANY_NAME,), (), t=empty_n)
        empty_t = {k: (v[:, :0] if v.dim() == 2 and v.shape[1] == ctx.t else v) for k, v in tensors.items()}
        attempt("T=0", RAISE_OR_FINITE, (ANY_NAME,), (), t=empty_t)
    for name, hp in spec.hypers.items():
        for kind, value, expect in hp_malformations(hp):
            attempt(f"{name}={kind}", expect, (name, *ALIASES.get(name, ())), (), h={**hypers, name: value})
        if hp.int_value is not None:
            ref = run(
                lambda name=name, hp=hp: spec.call(tensors, {**hypers, name: float(hp.int_value)}, objects)
            )
            out = run(
                lambda name=name, hp=hp: spec.call(tensors, {**hypers, name: int(hp.int_value)}, objects)
            )
            if hp.integer and isinstance(ref, ValueError):
                pass  # an integer argument may refuse 8.0
            elif isinstance(ref, ValueError) != isinstance(out, ValueError) or (
                not isinstance(ref, ValueError) and not same(ref, out)
            ):
                failures.append(f"{name}=int {hp.int_value}: {out!r} differs from float's {ref!r}")
    for name, (_, bad_values) in spec.objects.items():
        for value in bad_values:
            attempt(
                f"{name}={value!r}"[:80],
                RAISE,
                (name, *ALIASES.get(name, ())),
                (),
                o={**objects, name: value},
            )
    if spec.keyed is not None:
        keyed = spec.keyed

        def keyed_call(overrides: object) -> object:
            module = keyed(**hypers, in_keys=overrides)
            return module(make_td(tensors, ctx))

        for label, overrides, names in (
            ("in_keys unknown name", {"no_such_entry": "x"}, ("no_such_entry",)),
            ("in_keys renamed to an absent key", {spec.required_in[0]: ("nested", "absent")}, ("absent",)),
            ("in_keys sequence too short", ["x"], ("in_keys",)),
        ):
            if label.endswith("short") and len(spec.required_in) < 2:
                continue
            outcome = run(lambda overrides=overrides: keyed_call(overrides))
            problem = judge(label, outcome, RAISE, names, (), canonical)
            if problem is not None:
                failures.append(problem)
    return failures


def make_td(tensors: dict[str, object], ctx: Ctx | None) -> TensorDict:
    present = [v for v in tensors.values() if isinstance(v, torch.Tensor | TensorDictBase) and v.dim() >= 1]
    n = present[0].shape[0] if present else 0
    td = TensorDict({}, batch_size=[n])
    for key, value in tensors.items():
        td.set(key, value)  # type: ignore[arg-type]
    return td


# -- the table -------------------------------------------------------------------------------------

POLICY_TENSORS = {
    "log_probs": ("log_probs", "float_token", True),
    "old_log_probs": ("old_log_probs", "float_token", True),
    "response_mask": ("response_mask", "mask", True),
}
CLIPPER_TENSORS = {
    "log_ratio": ("log_ratio", "float_token", True),
    "advantages": ("advantages", "adv", True),
    "response_mask": ("response_mask", "mask", False),
}
REWARD_TENSORS = {
    "rewards": ("rewards", "float_seq", True),
    "group_ids": ("group_ids", "int_seq", True),
}
CLIPPER_TD = {**CLIPPER_TENSORS, "response_mask": ("response_mask", "mask", True)}
MAX_LOG_RATIO = HP(20.0, int_value=20, optional=True)
EPS = HP(1e-6, int_value=1)
AGG = HP("seq-mean-token-mean", choices=gc.AGGREGATIONS)


def fn_spec(fn: Callable[..., object], tensors: dict, hypers: dict | None = None, objects: dict | None = None
            ) -> Spec:  # fmt: skip
    def call(t: dict, h: dict, o: dict) -> object:
        return fn(**t, **h, **o)

    return Spec(call, tensors, hypers or {}, objects or {})


def module_spec(cls: Callable[..., Any], tensors: dict, hypers: dict | None = None, *, keyed: bool = True,
                pos: tuple[object, ...] = ()) -> Spec:  # fmt: skip
    def call(t: dict, h: dict, o: dict) -> object:
        module = cls(*pos, **h)
        out = module(make_td(t, None))
        return out.select(*module.out_keys, strict=False)

    probe = cls(*pos)
    required = tuple(getattr(probe, "_required_in", ()))
    return Spec(
        call,
        tensors,
        hypers or {},
        td_mode=True,
        keyed=(lambda **kw: cls(*pos, **kw)) if keyed else None,
        required_in=required,
    )


# recipe keywords whose negative values are valid: Clip-Cov's covariance bounds (lb <= cov <= ub)
NEGATIVE_OK = {("clip_cov", "lb"), ("clip_cov", "ub")}


def recipe_hypers(factory: Callable[..., gc.Recipe]) -> dict[str, HP]:
    """Every numeric or categorical keyword of a recipe factory, from its signature."""
    out: dict[str, HP] = {}
    for name, p in inspect.signature(factory).parameters.items():
        d = p.default
        if name == "aggregation":
            out[name] = HP(d, choices=gc.AGGREGATIONS)
        elif name == "mode":
            out[name] = HP(d, choices=("binary_tv", "binary_kl"))
        elif name == "tokens":
            out[name] = HP(d, choices=("all", "positive", "negative"))
        elif isinstance(d, float) and not isinstance(d, bool):
            optional = "None" in str(p.annotation)
            out[name] = HP(
                d,
                int_value=int(d) if d.is_integer() else None,
                optional=optional,
                negative_ok=(factory.__name__, name) in NEGATIVE_OK,
            )
        elif name == "dual_clip" and d is None:
            out[name] = HP(None, int_value=3, optional=True)
    return out


RECIPE_LOSS_EXTRA = {
    "ref_log_probs": ("ref_log_probs", "float_token", False),
    "entropy": ("entropy", "float_token", False),
    "response_ids": ("response_ids", "int_token", False),
    "group_ids": ("group_ids", "int_seq", False),
}


def recipe_loss_spec(factory: Callable[..., gc.Recipe]) -> Spec:
    required = factory().loss.required_keys
    tensors = {**POLICY_TENSORS, "advantages": ("advantages", "adv", True)}
    for key, (src, role, _) in RECIPE_LOSS_EXTRA.items():
        if key in required:
            tensors[key] = (src, role, True)

    def call(t: dict, h: dict, o: dict) -> object:
        return factory(**h).loss(make_td(t, None))

    return Spec(call, tensors, recipe_hypers(factory), td_mode=True)


def recipe_advantage_spec(factory: Callable[..., gc.Recipe]) -> Spec:
    def call(t: dict, h: dict, o: dict) -> object:
        recipe = factory(**h)
        return recipe.advantage(make_td(t, None)).select("advantages")

    tensors = {**REWARD_TENSORS, "reward_valid": ("reward_valid", "bool_seq", False)}
    adv_hypers = {k: v for k, v in recipe_hypers(factory).items() if k == "advantage_eps"}
    return Spec(call, tensors, adv_hypers, td_mode=True)


def _normalizers(b: dict[str, torch.Tensor]) -> gc.LossNormalizers:
    return gc.local_normalizers(b["response_mask"])


NOT_A_NORMALIZER = (None, 3.0, "x", {"num_tokens": 3.0})


def _validation_call(enabled: object) -> object:
    before = gc.is_validating()
    try:
        with gc.validation(enabled):  # type: ignore[arg-type]
            return gc.is_validating()
    finally:
        gc.set_validation(before)


def _set_validation_call(enabled: object) -> object:
    before = gc.is_validating()
    try:
        gc.set_validation(enabled)  # type: ignore[arg-type]
        return gc.is_validating()
    finally:
        gc.set_validation(before)


NOT_A_FLAG = ("yes", 1, None, 0.0)
NOT_A_PART = ("token", None, 3, torch.zeros(2))
UNCHECKED_PART: tuple[object, ...] = ()  # see test_parts_that_are_not_modules_are_refused


def _compose_call(t: dict, h: dict, o: dict) -> object:
    recipe = gc.compose(o["name"], o["advantage"], o["weighter"], o["clipper"], filters=o["filters"], **h)
    return recipe.loss(make_td(t, None))


def _policy_loss_call(t: dict, h: dict, o: dict) -> object:
    loss = gc.PolicyLoss(o["weighter"], o["clipper"], o["objective"], filters=o["filters"])
    return loss(make_td(t, None))


def _recipe_call(t: dict, h: dict, o: dict) -> object:
    recipe = gc.Recipe(o["name"], o["advantage"], o["loss"])
    return recipe.loss(make_td(t, None))


def _base_call(cls: type) -> Callable[[dict, dict, dict], object]:
    """A role base: constructed with its key overrides (its behaviour is the subclass's)."""

    def call(t: dict, h: dict, o: dict) -> object:
        return torch.tensor(float(len(cls(**h, **o).in_keys)))

    return call


def _keys_only(cls: type, extra: dict[str, HP] | None = None) -> Spec:
    return Spec(_base_call(cls), {}, extra or {}, {"in_keys": (lambda b: None, ({"no_such_entry": "x"}, 3))})


POLICY_BATCH = {**POLICY_TENSORS, "advantages": ("advantages", "adv", True)}

SPECS: dict[str, Spec] = {
    # role bases
    "AdvantageEstimator": _keys_only(gc.AdvantageEstimator),
    "Clipper": _keys_only(gc.Clipper, {"max_log_ratio": MAX_LOG_RATIO}),
    "ImportanceWeighter": _keys_only(gc.ImportanceWeighter),
    "TokenFilter": _keys_only(gc.TokenFilter),
    # advantages
    "BatchWhitenedAdvantage": module_spec(
        gc.BatchWhitenedAdvantage,
        {**REWARD_TENSORS, "reward_valid": ("reward_valid", "bool_seq", False)},
        {"eps": EPS},
    ),
    "GroupMeanAdvantage": module_spec(
        gc.GroupMeanAdvantage, {**REWARD_TENSORS, "reward_valid": ("reward_valid", "bool_seq", False)}
    ),
    "GroupNormalizedAdvantage": module_spec(
        gc.GroupNormalizedAdvantage,
        {**REWARD_TENSORS, "reward_valid": ("reward_valid", "bool_seq", False)},
        {"eps": EPS},
    ),
    "LeaveOneOutAdvantage": module_spec(
        gc.LeaveOneOutAdvantage, {**REWARD_TENSORS, "reward_valid": ("reward_valid", "bool_seq", False)}
    ),
    "PerTokenAdvantage": module_spec(
        gc.PerTokenAdvantage,
        {
            "token_advantages": ("token_advantages", "float_token", True),
            "response_mask": ("response_mask", "mask", True),
        },
    ),
    "batch_whitened_advantages": fn_spec(
        gc.batch_whitened_advantages,
        {**REWARD_TENSORS, "valid": ("reward_valid", "bool_seq", False)},
        {"eps": EPS},
    ),
    "group_mean_advantages": fn_spec(
        gc.group_mean_advantages, {**REWARD_TENSORS, "valid": ("reward_valid", "bool_seq", False)}
    ),
    "group_normalized_advantages": fn_spec(
        gc.group_normalized_advantages,
        {**REWARD_TENSORS, "valid": ("reward_valid", "bool_seq", False)},
        {"eps": EPS},
    ),
    "leave_one_out_advantages": fn_spec(
        gc.leave_one_out_advantages, {**REWARD_TENSORS, "valid": ("reward_valid", "bool_seq", False)}
    ),
    # weighters
    "TokenLogRatio": module_spec(gc.TokenLogRatio, POLICY_TENSORS),
    "SequenceLogRatio": module_spec(gc.SequenceLogRatio, POLICY_TENSORS),
    "SequenceTokenLogRatio": module_spec(gc.SequenceTokenLogRatio, POLICY_TENSORS),
    "token_log_ratio": fn_spec(gc.token_log_ratio, POLICY_TENSORS),
    "sequence_log_ratio": fn_spec(gc.sequence_log_ratio, POLICY_TENSORS),
    "sequence_mean_log_ratio": fn_spec(gc.sequence_mean_log_ratio, POLICY_TENSORS),
    "sequence_token_log_ratio": fn_spec(gc.sequence_token_log_ratio, POLICY_TENSORS),
    # clippers
    "PPOClip": module_spec(
        gc.PPOClip,
        CLIPPER_TD,
        {
            "eps_low": HP(0.2, int_value=0),
            "eps_high": HP(0.2, int_value=1),
            "dual_clip": HP(None, int_value=3, optional=True),
            "max_log_ratio": MAX_LOG_RATIO,
        },
    ),
    "CISPOClip": module_spec(
        gc.CISPOClip,
        CLIPPER_TD,
        {
            "eps_high": HP(0.28, int_value=1),
            "eps_low": HP(None, int_value=0, optional=True),
            "max_log_ratio": MAX_LOG_RATIO,
        },
    ),
    "SAPOGate": module_spec(
        gc.SAPOGate,
        CLIPPER_TD,
        {"tau_pos": HP(1.0, int_value=1), "tau_neg": HP(1.05, int_value=2), "max_log_ratio": MAX_LOG_RATIO},
    ),
    "NoClip": module_spec(gc.NoClip, CLIPPER_TD, {"max_log_ratio": MAX_LOG_RATIO}),
    "GMPOClip": module_spec(
        gc.GMPOClip,
        CLIPPER_TD,
        {"eps_low": HP(0.4, int_value=0), "eps_high": HP(0.4, int_value=1), "max_log_ratio": MAX_LOG_RATIO},
    ),
    "ppo_clip_loss": fn_spec(
        gc.ppo_clip_loss,
        CLIPPER_TENSORS,
        {
            "eps_low": HP(0.2, int_value=0),
            "eps_high": HP(0.2, int_value=1),
            "dual_clip": HP(None, int_value=3, optional=True),
            "max_log_ratio": MAX_LOG_RATIO,
        },
    ),
    "cispo_loss": fn_spec(
        gc.cispo_loss,
        CLIPPER_TENSORS,
        {
            "eps_high": HP(0.28, int_value=1),
            "eps_low": HP(None, int_value=0, optional=True),
            "max_log_ratio": MAX_LOG_RATIO,
        },
    ),
    "sapo_loss": fn_spec(
        gc.sapo_loss,
        CLIPPER_TENSORS,
        {"tau_pos": HP(1.0, int_value=1), "tau_neg": HP(1.05, int_value=2), "max_log_ratio": MAX_LOG_RATIO},
    ),
    "unclipped_loss": fn_spec(gc.unclipped_loss, CLIPPER_TENSORS, {"max_log_ratio": MAX_LOG_RATIO}),
    # filters
    "DPPOFilter": module_spec(
        gc.DPPOFilter,
        POLICY_BATCH,
        {
            "mode": HP("binary_tv", choices=("binary_tv", "binary_kl")),
            "delta_low": HP(0.2, int_value=1),
            "delta_high": HP(0.2, int_value=1),
        },
    ),
    "M2POFilter": module_spec(
        gc.M2POFilter, POLICY_BATCH, {"tau": HP(0.04, int_value=1), "tokens": HP("all", choices=("all",))}
    ),
    "OPSMFilter": module_spec(
        lambda delta=0.1, **kw: gc.OPSMFilter(delta, **kw),
        POLICY_BATCH,
        {"delta": HP(0.1, int_value=1, negative_ok=True)},
    ),
    "TopEntropyFilter": module_spec(
        gc.TopEntropyFilter,
        {"response_mask": ("response_mask", "mask", True), "entropy": ("entropy", "float_token", True)},
        {"quantile": HP(0.2, int_value=0)},
    ),
    # rollout correction
    "RolloutCorrection": module_spec(
        gc.RolloutCorrection,
        {
            "old_log_probs": ("old_log_probs", "float_token", True),
            "rollout_log_probs": ("rollout_log_probs", "float_token", True),
            "response_mask": ("response_mask", "mask", True),
        },
        {
            "level": HP("token", choices=("token", "sequence", "geometric")),
            "mode": HP("truncate", choices=("truncate", "mask")),
            "upper": HP(None, int_value=2, optional=True),
            "lower": HP(None, optional=True),
        },
    ),
    "rollout_correction_weights": fn_spec(
        gc.rollout_correction_weights,
        {
            "old_log_probs": ("old_log_probs", "float_token", True),
            "rollout_log_probs": ("rollout_log_probs", "float_token", True),
            "response_mask": ("response_mask", "mask", True),
        },
        {
            "level": HP("token", choices=("token", "sequence", "geometric")),
            "mode": HP("truncate", choices=("truncate", "mask")),
            "upper": HP(None, int_value=2, optional=True),
            "lower": HP(None, optional=True),
        },
    ),
    # objective and aggregation
    "Objective": module_spec(
        gc.Objective,
        {
            "token_loss": ("token_loss", "token_loss", True),
            "response_mask": ("response_mask", "mask", True),
            "log_ratio": ("log_ratio", "float_token", False),
            "clipped": ("clipped", "bool_token", False),
            "entropy": ("entropy", "float_token", False),
        },
        {
            "aggregation": AGG,
            "kl_coef": HP(0.0, int_value=0),
            "entropy_coef": HP(0.0, int_value=0, negative_ok=True),
            "max_length": HP(None, int_value=6, optional=True, integer=True),
        },
    ),
    "objective_loss": fn_spec(
        gc.objective_loss,
        {
            "token_loss": ("token_loss", "float_token", True),
            "response_mask": ("response_mask", "mask", True),
            "is_weights": ("is_weights", "float_token", False),
            "kl": ("ref_log_probs", "float_token", False),
            "entropy": ("entropy", "float_token", False),
        },
        {
            "aggregation": AGG,
            "kl_coef": HP(0.1, int_value=1),
            "entropy_coef": HP(0.0, int_value=0, negative_ok=True),
            "max_length": HP(None, int_value=6, optional=True, integer=True),
        },
        {"normalizers": (lambda b: None, NOT_A_NORMALIZER[1:])},
    ),
    "aggregate": fn_spec(
        gc.aggregate,
        {"values": ("token_loss", "float_token", True), "response_mask": ("response_mask", "mask", True)},
        {"aggregation": AGG},
        {"normalizers": (_normalizers, NOT_A_NORMALIZER)},
    ),
    "LossNormalizers": fn_spec(
        gc.LossNormalizers,
        {},
        {
            "num_tokens": HP(10.0, int_value=10),
            "num_sequences": HP(3.0, int_value=3),
            "max_length": HP(6.0, int_value=6),
            "num_replicas": HP(1, int_value=1, integer=True),
        },
    ),
    "local_normalizers": fn_spec(
        gc.local_normalizers,
        {"response_mask": ("response_mask", "mask", True)},
        {"max_length": HP(None, int_value=6, optional=True, integer=True)},
    ),
    "step_normalizers": fn_spec(
        gc.step_normalizers,
        {"micro_batches": ("response_mask", "mask", True)},
        {"max_length": HP(None, int_value=6, optional=True, integer=True)},
    ),
    "loss_metrics": fn_spec(
        gc.loss_metrics,
        {
            "response_mask": ("response_mask", "mask", True),
            "log_ratio": ("log_ratio", "float_token", False),
            "clipped": ("clipped", "bool_token", False),
            "kl": ("ref_log_probs", "float_token", False),
            "entropy": ("entropy", "float_token", False),
            "is_weights": ("is_weights", "float_token", False),
        },
    ),
    "kl_penalty": fn_spec(
        gc.kl_penalty,
        {
            "log_probs": ("log_probs", "float_token", True),
            "ref_log_probs": ("ref_log_probs", "float_token", True),
            "response_mask": ("response_mask", "mask", True),
        },
        {"estimator": HP("k3", choices=("k1", "k2", "k3"))},
    ),
    # composition
    "PolicyLoss": Spec(
        _policy_loss_call,
        POLICY_BATCH,
        {},
        {
            "weighter": (lambda b: gc.TokenLogRatio(), UNCHECKED_PART),
            "clipper": (lambda b: gc.PPOClip(), UNCHECKED_PART),
            "objective": (lambda b: gc.Objective(), UNCHECKED_PART),
            "filters": (lambda b: (), (["x"], [gc.PPOClip()])),
        },
        td_mode=True,
    ),
    "Recipe": Spec(
        _recipe_call,
        POLICY_BATCH,
        {},
        {
            "name": (lambda b: "mine", ("", 3, None)),
            "advantage": (lambda b: gc.GroupNormalizedAdvantage(), UNCHECKED_PART),
            "loss": (lambda b: gc.grpo().loss, UNCHECKED_PART),
        },
        td_mode=True,
    ),
    "compose": Spec(
        _compose_call,
        POLICY_BATCH,
        {
            "aggregation": AGG,
            "kl_coef": HP(0.0, int_value=0),
            "kl_estimator": HP("k3", choices=("k1", "k2", "k3")),
            "entropy_coef": HP(0.0, int_value=0, negative_ok=True),
            "max_length": HP(None, int_value=6, optional=True, integer=True),
        },
        {
            "name": (lambda b: "mine", ("", 3, None)),
            "advantage": (lambda b: gc.GroupNormalizedAdvantage(), UNCHECKED_PART),
            "weighter": (lambda b: gc.TokenLogRatio(), UNCHECKED_PART),
            "clipper": (lambda b: gc.PPOClip(), UNCHECKED_PART),
            "filters": (lambda b: (), (["x"], [gc.PPOClip()])),
        },
        td_mode=True,
    ),
    # the validation switch
    "is_validating": Spec(lambda t, h, o: torch.tensor(float(gc.is_validating()))),
    "set_validation": Spec(
        lambda t, h, o: torch.tensor(float(_set_validation_call(o["enabled"]))),
        objects={"enabled": (lambda b: True, NOT_A_FLAG)},
    ),
    "validation": Spec(
        lambda t, h, o: torch.tensor(float(_validation_call(o["enabled"]))),
        objects={"enabled": (lambda b: True, NOT_A_FLAG)},
    ),
}
# Reported, not fixed here (the lead's files): the Objective does not check its metric-only inputs
# (log_ratio read for the ratio metrics, entropy in objective_loss) for NaN/±inf at valid
# positions; the metric comes out non-finite.
SPECS["Objective"].non_finite_passes = ("log_ratio",)
SPECS["objective_loss"].non_finite_passes = ("entropy",)
# loss_metrics reports what it is given: NaN in a metric input, or the ratio metrics of an
# all-padding mask (no token), come out NaN (reported).
SPECS["loss_metrics"].non_finite_passes = ("log_ratio", "kl", "entropy", "is_weights", "response_mask")

# PerTokenAdvantage passes its input through, padding included (test_advantages.py): what it writes
# at padding is the caller's padding, inert downstream; its valid positions are compared here.
_per_token_call = SPECS["PerTokenAdvantage"].call
SPECS["PerTokenAdvantage"].call = lambda t, h, o: _valid_only(_per_token_call(t, h, o), t)


def _valid_only(out: TensorDictBase, t: dict) -> TensorDictBase:
    mask = t.get("response_mask")
    adv = out["advantages"]
    if isinstance(mask, torch.Tensor) and not mask.is_complex() and mask.shape == adv.shape:
        out["advantages"] = torch.where(mask != 0, adv, 0.0)
    return out


for _name, _factory in gc.RECIPES.items():
    SPECS[_name] = recipe_loss_spec(_factory)
    SPECS[f"{_name}.advantage"] = recipe_advantage_spec(_factory)

# -- beyond gspo_components.__all__: the fused head, the scorer, the rewards -------------------------

VOCAB = 16
_MODEL: list[torch.nn.Module] = []


def tiny_model() -> torch.nn.Module:
    if not _MODEL:
        _MODEL.append(
            build_tiny_qwen3(
                VOCAB,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=32,
                intermediate_size=32,
                max_position_embeddings=32,
                seed=0,
            ).eval()
        )
    return _MODEL[0]


def _llp_call(t: dict, h: dict, o: dict) -> object:
    return linear_log_probs(**t, **h, return_entropy=True)


def _scorer_call(t: dict, h: dict, o: dict) -> object:
    prompt = t.get("prompt_ids")
    with torch.no_grad():
        return response_log_probs(tiny_model(), prompt_ids=prompt, prompt_mask=t.get("prompt_mask"),
                                  response_ids=t.get("response_ids"), response_mask=t.get("response_mask"),
                                  **h)  # fmt: skip


def reward_spec(
    build: Callable[..., rw.RewardFn], hypers: dict[str, HP], objects: dict | None = None
) -> Spec:
    """A RewardFn: constructed with the (malformed) arguments and run on a text batch whose
    columns are dropped or replaced one at a time."""
    probe = build(
        **{k: hp.valid for k, hp in hypers.items()},
        **{k: v[0](TEXT_PROBE) for k, v in (objects or {}).items()},
    )
    tensors = {key: (key, TEXT_ROLES.get(key, "column"), True) for key in probe.in_keys}

    def call(t: dict, h: dict, o: dict) -> object:
        return build(**h, **o)(make_td(t, None)).select("rewards", "reward_valid")

    return Spec(call, tensors, hypers, objects or {}, td_mode=True)


TEXT_ROLES = {"response_mask": "mask_alone", "data_index": "int_seq"}
TEXT_PROBE: dict[str, torch.Tensor] = {}


TIMEOUT = HP(10.0, int_value=10, optional=True)
EXTRA_SPECS: dict[str, Spec] = {
    "fused.linear_log_probs": fn_spec(
        linear_log_probs,
        {
            "hidden": ("hidden", "adv", True),
            "weight": ("weight", "adv", True),
            "targets": ("targets", "int_seq", True),
            "bias": ("bias", "adv", False),
        },
        {
            "temperature": HP(1.0, int_value=1),
            "chunk_size": HP(None, int_value=2, optional=True, integer=True),
            "backend": HP("auto", choices=("auto", "torch")),
        },
    ),
    "rollout.scoring.response_log_probs": Spec(
        _scorer_call,
        {
            "prompt_ids": ("response_ids", "int_token", True),
            "prompt_mask": ("prompt_mask", "mask", True),
            "response_ids": ("response_ids", "int_token", True),
            "response_mask": ("response_mask", "mask", True),
        },
        {
            "temperature": HP(1.0, int_value=1),
            "chunk_size": HP(None, int_value=2, optional=True, integer=True),
            "backend": HP("auto", choices=("auto", "torch")),
        },
    ),
    "rewards.FormatReward": reward_spec(
        rw.FormatReward,
        {
            "reward": HP(1.0, int_value=1, negative_ok=True),
            "penalty": HP(0.0, int_value=0, negative_ok=True),
            "timeout": TIMEOUT,
        },
        {"pattern": (lambda b: r"<answer>\d</answer>", ("(", 3, None))},
    ),
    "rewards.MathAnswerReward": reward_spec(
        rw.MathAnswerReward,
        {
            "correct": HP(1.0, int_value=1, negative_ok=True),
            "incorrect": HP(0.0, int_value=0, negative_ok=True),
            "max_response_chars": HP(4096, int_value=64, integer=True),
            "max_answer_chars": HP(1024, int_value=64, integer=True),
        },
    ),
    "rewards.OverlongPenalty": reward_spec(
        rw.OverlongPenalty,
        {"max_length": HP(4, int_value=4, integer=True), "cache_length": HP(2, int_value=2, integer=True)},
    ),
    "rewards.overlong_penalty": fn_spec(
        rw.overlong_penalty,
        {"lengths": ("lengths", "int_seq", True)},
        {"max_length": HP(4, int_value=4, integer=True), "cache_length": HP(2, int_value=2, integer=True)},
    ),
    "rewards.WeightedSum": reward_spec(
        rw.WeightedSum,
        {"timeout": TIMEOUT},
        {
            "terms": (
                lambda b: {"fmt": (rw.FormatReward(r"\d"), 0.5), "len": rw.OverlongPenalty(4, 2)},
                (
                    {},
                    {"a": "x"},
                    {"a": (rw.FormatReward("a"), math.nan)},
                    {"a": (rw.FormatReward("a"), "1")},
                    {"a": (rw.FormatReward("a"), True)},
                ),
            )
        },
    ),
    "rewards.RewardFn": reward_spec(
        rw.RewardFn, {"timeout": TIMEOUT}, {"in_keys": (lambda b: None, ({"no_such_entry": "x"}, ["a", "b"]))}
    ),
    "rewards.as_list": fn_spec(
        lambda value, n, key: torch.tensor([float(len(rw.as_list(value, n, key)))]),
        {},
        {},
        {
            "value": (lambda b: [1, 2, 3], ([1, 2],)),
            "n": (lambda b: 3, (-1, "3", None)),
            "key": (lambda b: "value", ()),
        },
    ),
    "rewards.extract_tagged_answer": fn_spec(
        lambda text: torch.tensor(float(len(rw.extract_tagged_answer(text)))),
        {},
        {},
        {"text": (lambda b: "<answer> 4 </answer>", (None, 4, b"x"))},
    ),
}
# The fused head computes log-probs from whatever its inputs hold: NaN in gives NaN out (a −inf
# bias bans a token, by design); the loss refuses non-finite valid log-probs downstream.
EXTRA_SPECS["fused.linear_log_probs"].non_finite_passes = ("hidden", "weight", "bias")
_RG: list[object] = []


def _rg_dataset() -> object:
    if not _RG:
        import reasoning_gym

        _RG.append(reasoning_gym.create_dataset("basic_arithmetic", size=8, seed=0))
    return _RG[0]


EXTRA_SPECS["rewards.ReasoningGymReward"] = reward_spec(
    lambda dataset, **kw: rw.ReasoningGymReward(dataset, **kw),
    {"timeout": TIMEOUT},
    {"dataset": (lambda b: _rg_dataset(), ("no_such_dataset", None))},
)
# Types in rewards.__all__ that are no reward function and take no batch (an exception class and
# a failure record); RewardFailure's constructor takes anything by design (it records it).
NOT_CALLED = {"RewardFailure", "RewardTimeout"}


def _public_callables() -> list[str]:
    return sorted(
        n for n in gc.__all__ if inspect.isfunction(getattr(gc, n)) or inspect.isclass(getattr(gc, n))
    )


def test_specs_cover_every_public_callable() -> None:
    uncovered = [n for n in _public_callables() if n not in SPECS]
    assert not uncovered, f"public callables without a malformed-input spec in SPECS: {uncovered}"
    assert len(_public_callables()) >= 60
    uncovered_rewards = [
        n for n in rw.__all__ if f"rewards.{n}" not in EXTRA_SPECS and n not in NOT_CALLED
    ]  # fmt: skip
    assert not uncovered_rewards, f"reward callables without a spec: {uncovered_rewards}"


@pytest.mark.parametrize("bad", NOT_A_PART, ids=["str", "None", "int", "tensor"])
@pytest.mark.parametrize("role", ["weighter", "clipper", "objective", "advantage", "loss"])
def test_parts_that_are_not_modules_are_refused(role: str, bad: object) -> None:
    batch, _ = _fixed_batch()
    spec = SPECS["Recipe"] if role in ("advantage", "loss") else SPECS["PolicyLoss"]
    tensors = {arg: batch[src] for arg, (src, _, _) in spec.tensors.items()}
    objects = {name: build(batch) for name, (build, _) in spec.objects.items()}
    with pytest.raises(ValueError, match=role):
        spec.call(tensors, {}, {**objects, role: bad})


def _fixed_batch() -> tuple[dict[str, torch.Tensor], Ctx]:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    lp = torch.tensor([[-1.0, -0.5, 0.0], [-2.0, 0.0, 0.0]])
    b = {"log_probs": lp, "old_log_probs": lp - 0.1, "advantages": torch.tensor([1.0, -1.0]),
         "response_mask": mask}  # fmt: skip
    return b, Ctx(2, 3, mask, 0, 0, math.nan, td_mode=True)


def _scorer_batch(b: dict[str, torch.Tensor]) -> None:
    b["prompt_mask"] = torch.ones_like(b["response_mask"])
    b["response_ids"] = b["response_ids"] % VOCAB


@pytest.mark.parametrize("name", sorted(SPECS) + sorted(EXTRA_SPECS))
@MODULE_SETTINGS
@given(drawn=batches())
def test_malformed_inputs(name: str, drawn: tuple[dict[str, torch.Tensor], Ctx]) -> None:
    batch, ctx = drawn
    spec = SPECS.get(name) or EXTRA_SPECS[name]
    if name == "rollout.scoring.response_log_probs":
        _scorer_batch(batch)
    assert gc.is_validating()
    failures = check_spec(spec, batch, ctx)
    note(f"{name}: n={ctx.n} t={ctx.t} valid position=({ctx.row}, {ctx.col}) garbage={ctx.garbage}")
    assert not failures, f"{name}: {len(failures)} malformed inputs handled wrongly:\n" + "\n".join(failures)
