"""Fused log-probs tests: property 15 of docs/algorithms.md for ``linear_log_probs(backend="torch")``.

Every reference below is an independent float64 computation written here: the logits
``(h Wᵀ + b) / τ`` are materialised in float64 from the inputs *as given* (bf16 inputs are
upcast after their rounding, so the reference sees the same numbers the library sees), then
``torch.log_softmax`` + ``gather`` give the log-probs, ``−Σ p log p`` the entropy, and float64
autograd the gradients. Nothing here calls into the library to build an expected value.

Tolerances are in units of the largest logit magnitude ``ζ = max (|h| |W|ᵀ + |b|)/τ`` (the scale
of the rounding error of any logit): values within ``K·(1 + ζ)``; each gradient entry within
``K·(1 + ζ)·m``, where ``m`` is the same gradient computed with absolute values
(``|∂z| |W|``, ``|∂z|ᵀ |h|``, ``Σ |∂z|`` with ``|∂z| = (|g|(1[v=y] + p) + |g_H| p (|log p| + H + 1))/τ``),
the standard componentwise bound for a matmul of perturbed factors. K is 1e-10 in float64 and
64 float32 units in float32 (the H ≤ 48-term dot products and the reductions). In bf16 the
logits themselves are rounded to 8 significant bits (u = 2⁻⁸): log-probs must be within
``2u(1 + ζ)`` (each logit moves by at most uζ, and log p_y = z_y − lse moves by at most twice
that), entropies within ``2u(1 + ζ)(1 + H)``, and both no worse than an eager baseline computed
here (bf16 matmul → float32 ``log_softmax``) plus float32 slack; bf16 gradients no worse than
that baseline's gradients plus two units ``u(1 + ζ)·m``.

Proves, for ``backend="torch"``:

- ``test_torch_matches_float64_reference`` (hypothesis; float64, float32, bf16): log-probs and
  (``return_entropy=True``) entropies, and the gradients wrt hidden, weight and bias for a random
  upstream gradient on both outputs, equal the float64 reference, across leading batch shapes
  ([M], [B, T], [B, T, S]), M ≤ 64, H ≤ 48, V ≤ 130, chunk sizes 1..M+5 and None, temperatures
  0.3..3 (and exactly 1), bias or none, logit scales 0.1..5 and 0%, 30% or 100% ignored targets;
  outputs are float32 for float32/bf16 inputs (float64 for float64), gradients have the input
  dtypes; an ignored target gives log-prob exactly 0, entropy exactly 0, an exactly zero hidden
  gradient row, and no gradient contribution at all even when its upstream gradient is huge;
- ``test_chunk_size_invariance`` (hypothesis; float64): chunk sizes 1, 7, M and None give the
  same values and gradients to 1e-12;
- ``test_large_logit_offset`` (float64, float32): with every logit shifted by a common 100 or
  1000 (through the bias; τ = 0.5), values, entropies and gradients stay within the same
  K·(1 + ζ) tolerance, which grows linearly with the shift as the rounding of the shifted logits
  does (an eager float32 log_softmax is 100× inside it): an entropy formula whose error grows
  like ε·ζ² (lse − Σ p z with Σ p ≠ 1 by O(εζ)) fails it;
- ``test_auto_backend_on_cpu``: ``backend="auto"`` on CPU tensors gives the torch backend's
  results exactly;
- ``test_frozen_weight``: with ``weight.requires_grad=False`` no [V, H] tensor is allocated in the
  backward (no weight gradient is computed: a dispatch-mode probe sees every aten output), the
  hidden and bias gradients are unchanged and still equal the reference; the probe does see the
  weight gradient when the weight is trainable;
- ``test_gradcheck``: ``torch.autograd.gradcheck`` in float64 for log-probs and entropies, with and
  without bias, at τ ≠ 1, with an ignored target and several chunks;
- ``test_empty_rows``: zero rows give empty outputs of the right shape and dtype;
- ``test_errors``: every invalid argument (weight not 2-D, hidden's last dim ≠ H, float targets,
  non-tensor targets, targets of the wrong shape, targets out of range and not ignore_index,
  τ ≤ 0 or NaN, unknown backend, chunk_size < 1, bias of the wrong shape, hidden/weight dtype
  mismatch, integer hidden) raises ValueError with a message naming it;
- ``test_saved_tensors_are_small``: everything the forward saves for the backward (seen through
  ``saved_tensors_hooks``) has fewer than M·V elements when chunk_size < M (while the eager
  reference saves an M×V tensor under the same hook);
- ``test_never_more_than_one_chunk_of_logits``: during forward and backward (float32, M = 64,
  H = 6, V = 50, chunk 8) no aten op returns a tensor whose storage exceeds one chunk of logits,
  chunk_size·V float32 elements (≥ the [M, H] and [V, H] inputs here), far below M·V, while the
  same probe sees an M×V allocation with chunk_size = M.

The Triton backend gets the same checks in test_fused_triton.py, through the helpers here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from gspo_components.fused import linear_log_probs

IGNORE = -100
F32_UNIT = 64 * 2.0**-24  # K for float32 (see the module docstring)
F64_UNIT = 1e-10  # K for float64
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
TINY = {torch.float64: 1e-300, torch.float32: 1e-30, torch.bfloat16: 1e-30}  # below float32 underflow


# ---------------------------------------------------------------------------------------------
# Problems, the library run and the independent float64 reference
# ---------------------------------------------------------------------------------------------


@dataclass(repr=False)
class Problem:
    hidden: torch.Tensor  # [..., H] in the tested dtype
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    targets: torch.Tensor  # [...] int64, IGNORE where ignored
    temperature: float
    chunk_size: int | None
    with_entropy: bool
    grad_lp: torch.Tensor  # upstream gradient on the log-probs (huge at ignored positions)
    grad_ent: torch.Tensor  # upstream gradient on the entropies
    recipe: str = ""  # how make_problem built it (for failure reports)

    def __repr__(self) -> str:
        return (
            f"Problem(shape={list(self.targets.shape)}, H={self.hidden.shape[-1]}, V={self.weight.shape[0]}, "
            f"dtype={self.hidden.dtype}, temperature={self.temperature!r}, chunk_size={self.chunk_size}, "
            f"bias={self.bias is not None}, ignored={int((self.targets == IGNORE).sum())}/{self.rows}, "
            f"with_entropy={self.with_entropy}, {self.recipe})"
        )

    @property
    def rows(self) -> int:
        return self.targets.numel()


def make_problem(
    shape: tuple[int, ...],
    width: int,
    vocab: int,
    *,
    dtype: torch.dtype,
    seed: int = 0,
    scale: float = 1.0,
    temperature: float = 1.0,
    bias: bool = True,
    ignored: float = 0.3,
    chunk_size: int | None = None,
    with_entropy: bool = True,
    offset: float = 0.0,
) -> Problem:
    """Values from a seeded generator: h ~ N(0, 1), W ~ N(0, scale²/H), b ~ offset + N(0, scale²),
    a fraction ``ignored`` of the targets set to IGNORE (exactly all of them when 1.0)."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    hidden = torch.randn(*shape, width, generator=gen, dtype=f64)
    weight = torch.randn(vocab, width, generator=gen, dtype=f64) * (scale / math.sqrt(width))
    b = torch.randn(vocab, generator=gen, dtype=f64) * scale + offset
    targets = torch.randint(0, vocab, shape, generator=gen)
    ignore = (
        torch.rand(shape, generator=gen) < ignored if ignored < 1.0 else torch.ones(shape, dtype=torch.bool)
    )
    targets = torch.where(ignore, torch.full_like(targets, IGNORE), targets)
    grad_lp = torch.randn(shape, generator=gen, dtype=f64)
    grad_lp = torch.where(ignore, 1e3 * torch.randn(shape, generator=gen, dtype=f64), grad_lp)
    grad_ent = torch.randn(shape, generator=gen, dtype=f64)
    grad_ent = torch.where(ignore, -1e3 * torch.randn(shape, generator=gen, dtype=f64), grad_ent)
    return Problem(
        hidden=hidden.to(dtype),
        weight=weight.to(dtype),
        bias=b.to(dtype) if bias else None,
        targets=targets,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        grad_lp=grad_lp.to(out_dtype),
        grad_ent=grad_ent.to(out_dtype),
        recipe=f"seed={seed}, scale={scale}, offset={offset}",
    )


@st.composite
def problems(
    draw: st.DrawFn,
    *,
    dtype: torch.dtype,
    max_rows: int = 64,
    max_width: int = 48,
    max_vocab: int = 130,
) -> Problem:
    """Leading shape [M], [B, T] or [B, T, S] with M ≤ max_rows, H and V from 1, chunk sizes
    1..M+5 or None, τ in 0.3..3 (or exactly 1), bias or none, 0/30/100% ignored targets."""
    shape: list[int] = []
    budget = max_rows
    for _ in range(draw(st.integers(1, 3))):
        d = draw(st.integers(1, budget))
        shape.append(d)
        budget //= d
    rows = math.prod(shape)
    return make_problem(
        tuple(shape),
        draw(st.integers(1, max_width)),
        draw(st.integers(1, max_vocab)),
        dtype=dtype,
        seed=draw(st.integers(0, 2**32 - 1)),
        scale=draw(st.sampled_from([0.1, 1.0, 5.0])),
        temperature=draw(st.one_of(st.floats(0.3, 3.0), st.just(1.0))),
        bias=draw(st.booleans()),
        ignored=draw(st.sampled_from([0.0, 0.3, 1.0])),
        chunk_size=draw(st.one_of(st.integers(1, rows + 5), st.none())),
        with_entropy=draw(st.booleans()),
    )


@dataclass
class Outcome:
    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    grads: dict[str, torch.Tensor]


def _leaves(p: Problem, freeze_weight: bool = False) -> dict[str, torch.Tensor]:
    leaves = {"hidden": p.hidden.detach().clone().requires_grad_()}
    leaves["weight"] = p.weight.detach().clone().requires_grad_(not freeze_weight)
    if p.bias is not None:
        leaves["bias"] = p.bias.detach().clone().requires_grad_()
    return leaves


def _backprop(
    leaves: dict[str, torch.Tensor], lp: torch.Tensor, ent: torch.Tensor | None, p: Problem
) -> Outcome:
    loss = (lp * p.grad_lp.to(lp.dtype)).sum()
    if ent is not None:
        loss = loss + (ent * p.grad_ent.to(ent.dtype)).sum()
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return Outcome(lp.detach(), None if ent is None else ent.detach(), dict(zip(names, grads, strict=True)))


def call_library(
    p: Problem, leaves: dict[str, torch.Tensor], *, backend: str, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear_log_probs on ``leaves``; (log-probs, entropies or None)."""
    out = linear_log_probs(
        leaves["hidden"],
        leaves["weight"],
        p.targets,
        temperature=p.temperature,
        bias=leaves.get("bias"),
        chunk_size=chunk_size,
        backend=backend,
        return_entropy=p.with_entropy,
    )
    if p.with_entropy:
        assert isinstance(out, tuple) and len(out) == 2
        return out
    assert isinstance(out, torch.Tensor)
    return out, None


def run_library(
    p: Problem,
    *,
    backend: str = "torch",
    chunk_size: int | str | None = "problem",
    freeze_weight: bool = False,
) -> Outcome:
    leaves = _leaves(p, freeze_weight)
    chunk = p.chunk_size if chunk_size == "problem" else chunk_size
    assert chunk is None or isinstance(chunk, int)
    lp, ent = call_library(p, leaves, backend=backend, chunk_size=chunk)
    return _backprop(leaves, lp, ent, p)


@dataclass
class Reference:
    outcome: Outcome  # float64
    zeta: float  # max (|h| |W|ᵀ + |b|)/τ
    magnitudes: dict[str, torch.Tensor]  # the gradients computed with absolute values
    max_entropy: float


def _per_token(logp: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = targets != IGNORE
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lp = torch.where(valid, logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    return lp, ent


def reference(p: Problem) -> Reference:
    """float64: materialised logits, torch.log_softmax, gather; float64 autograd."""
    leaves = {k: v.double().requires_grad_() for k, v in _leaves(p).items()}
    h, w, b = leaves["hidden"], leaves["weight"], leaves.get("bias")
    logits = h @ w.T
    if b is not None:
        logits = logits + b
    logits = logits / p.temperature
    logp = torch.log_softmax(logits, dim=-1)
    lp, ent = _per_token(logp, p.targets)
    outcome = _backprop(leaves, lp, ent if p.with_entropy else None, p)
    with torch.no_grad():
        h0, w0 = h.detach().abs(), w.detach().abs()
        s = h0 @ w0.T
        if b is not None:
            s = s + b.detach().abs()
        zeta = float(s.max()) / p.temperature
        valid = p.targets != IGNORE
        probs = logp.detach().exp()
        onehot = torch.zeros_like(probs).scatter_(-1, torch.where(valid, p.targets, 0).unsqueeze(-1), 1.0)
        g = torch.where(valid, p.grad_lp.double().abs(), 0.0).unsqueeze(-1)
        dz = g * (onehot + probs)
        if p.with_entropy:
            gh = torch.where(valid, p.grad_ent.double().abs(), 0.0).unsqueeze(-1)
            dz = dz + gh * probs * (logp.detach().abs() + ent.detach().unsqueeze(-1) + 1.0)
        dz = (dz / p.temperature).reshape(-1, dz.shape[-1])
        mags = {"hidden": (dz @ w0).reshape(h.shape), "weight": dz.T @ h0.reshape(-1, h0.shape[-1])}
        if b is not None:
            mags["bias"] = dz.sum(0)
        max_ent = float(ent.detach().max()) if ent.numel() else 0.0
    return Reference(outcome, zeta, mags, max_ent)


def eager_baseline(p: Problem) -> Outcome:
    """The usual unfused path: the matmul in the inputs' dtype (for bf16 inputs: logits rounded to
    bf16), then float32 log_softmax and gather; torch autograd for the gradients."""
    leaves = _leaves(p)
    h, w, b = leaves["hidden"], leaves["weight"], leaves.get("bias")
    logits = (h @ w.T).float()
    if b is not None:
        logits = logits + b.float()
    logits = logits / p.temperature
    lp, ent = _per_token(torch.log_softmax(logits, dim=-1), p.targets)
    return _backprop(leaves, lp, ent if p.with_entropy else None, p)


# ---------------------------------------------------------------------------------------------
# The comparison (shared with test_fused_triton.py)
# ---------------------------------------------------------------------------------------------


def _grad_units(got: torch.Tensor, want: torch.Tensor, unit: torch.Tensor, tiny: float) -> float:
    """max |got − want| / unit, entrywise (unit may be 0 where the gradient must be exactly 0)."""
    return float(((got.double() - want).abs() / (unit + tiny)).max()) if got.numel() else 0.0


def assert_matches_reference(p: Problem, got: Outcome, *, baseline: Outcome | None = None) -> Reference:
    """Dtypes, exact zeros at ignored targets, then values and gradients against the float64
    reference within the tolerances of the module docstring."""
    dtype = p.hidden.dtype
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ignored = p.targets == IGNORE
    assert got.log_probs.dtype == out_dtype
    assert got.log_probs.shape == p.targets.shape
    assert bool((got.log_probs[ignored] == 0).all())
    if p.with_entropy:
        assert got.entropy is not None
        assert got.entropy.dtype == out_dtype and got.entropy.shape == p.targets.shape
        assert bool((got.entropy[ignored] == 0).all())
    assert bool((got.grads["hidden"][ignored] == 0).all()), "ignored targets leaked a hidden gradient"
    for k, v in got.grads.items():
        source = {"hidden": p.hidden, "weight": p.weight, "bias": p.bias}[k]
        assert source is not None
        assert v.dtype == source.dtype and v.shape == source.shape, k
        assert bool(torch.isfinite(v).all()), k

    ref = reference(p)
    want = ref.outcome
    assert set(got.grads) == set(want.grads)
    zeta = ref.zeta
    values = [("log_probs", got.log_probs, want.log_probs)]
    if p.with_entropy:
        assert got.entropy is not None and want.entropy is not None
        values.append(("entropy", got.entropy, want.entropy))

    if dtype in (torch.float64, torch.float32):
        unit = F64_UNIT if dtype == torch.float64 else F32_UNIT
        for name, g, w in values:
            err = float((g.double() - w).abs().max())
            assert err <= unit * (1 + zeta), f"{name}: error {err:.3g} > {unit * (1 + zeta):.3g}"
        for k, g in got.grads.items():
            err_units = _grad_units(g, want.grads[k], unit * (1 + zeta) * ref.magnitudes[k], TINY[dtype])
            assert err_units <= 1.0, f"d{k}: error {err_units:.3g} × the tolerance"
        return ref

    assert dtype == torch.bfloat16, dtype
    assert baseline is not None
    slack = F32_UNIT * (1 + zeta)
    base_values = {"log_probs": baseline.log_probs, "entropy": baseline.entropy}
    analytic = {
        "log_probs": 2 * BF16_U * (1 + zeta),
        "entropy": 2 * BF16_U * (1 + zeta) * (1 + ref.max_entropy),
    }
    for name, g, w in values:
        err = float((g.double() - w).abs().max())
        base_err = float((base_values[name].double() - w).abs().max())
        assert err <= base_err + slack, f"{name}: error {err:.3g} > eager bf16 {base_err:.3g} + slack"
        assert err <= analytic[name] + slack, (
            f"{name}: error {err:.3g} > bf16 logit bound {analytic[name]:.3g}"
        )
    for k, g in got.grads.items():
        unit = BF16_U * (1 + zeta) * ref.magnitudes[k]
        err_units = _grad_units(g, want.grads[k], unit, TINY[dtype])
        base_units = _grad_units(baseline.grads[k], want.grads[k], unit, TINY[dtype])
        assert err_units <= base_units + 2.0, f"d{k}: {err_units:.3g} units vs eager bf16 {base_units:.3g}"
    return ref


def check_problem(p: Problem, *, backend: str = "torch") -> Reference:
    got = run_library(p, backend=backend)
    baseline = eager_baseline(p) if p.hidden.dtype == torch.bfloat16 else None
    return assert_matches_reference(p, got, baseline=baseline)


class AllocationProbe(TorchDispatchMode):
    """Records, for every aten op, its name and each output's shape and storage (bytes, address)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, tuple[int, ...], int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.outputs.append((str(func), tuple(t.shape), storage.nbytes(), storage.data_ptr()))
        return out

    def max_storage(self) -> int:
        return max((n for _, _, n, _ in self.outputs), default=0)


def fresh_weight_sized(probe: AllocationProbe, weight: torch.Tensor) -> list[str]:
    """Ops that returned a new [V, H] or [H, V] tensor (not a view of the weight itself)."""
    shapes = {tuple(weight.shape), tuple(weight.shape[::-1])}
    own = weight.untyped_storage().data_ptr()
    return [name for name, shape, _, ptr in probe.outputs if shape in shapes and ptr != own]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=100)
@given(data=st.data())
def test_torch_matches_float64_reference(dtype: torch.dtype, data: st.DataObject) -> None:
    check_problem(data.draw(problems(dtype=dtype)), backend="torch")


@settings(max_examples=60)
@given(p=problems(dtype=torch.float64))
def test_chunk_size_invariance(p: Problem) -> None:
    runs = [run_library(p, chunk_size=c) for c in (1, 7, p.rows, None)]
    first = runs[0]
    for other in runs[1:]:
        torch.testing.assert_close(other.log_probs, first.log_probs, rtol=0, atol=1e-12)
        if p.with_entropy:
            torch.testing.assert_close(other.entropy, first.entropy, rtol=0, atol=1e-12)
        assert set(other.grads) == set(first.grads)
        for k in first.grads:
            torch.testing.assert_close(other.grads[k], first.grads[k], rtol=1e-12, atol=1e-12)


def test_auto_backend_on_cpu() -> None:
    p = make_problem((3, 5), 7, 11, dtype=torch.float32, temperature=0.8, chunk_size=4)
    auto, torch_ = run_library(p, backend="auto"), run_library(p, backend="torch")
    assert torch.equal(auto.log_probs, torch_.log_probs)
    assert auto.entropy is not None and torch_.entropy is not None
    assert torch.equal(auto.entropy, torch_.entropy)
    for k in torch_.grads:
        assert torch.equal(auto.grads[k], torch_.grads[k])


def frozen_weight_check(dtype: torch.dtype, backend: str, device: str = "cpu") -> None:
    """Weight frozen: no [V, H] tensor allocated in the backward; hidden/bias gradients unchanged
    and still equal to the reference."""
    p = problem_to(make_problem((2, 9), 5, 37, dtype=dtype, temperature=1.7, chunk_size=4, seed=3), device)
    full = run_library(p, backend=backend)

    leaves = _leaves(p, freeze_weight=True)
    lp, ent = call_library(p, leaves, backend=backend, chunk_size=p.chunk_size)
    with AllocationProbe() as probe:
        frozen = _backprop(leaves, lp, ent, p)
    assert leaves["weight"].grad is None
    assert set(frozen.grads) == {"hidden", "bias"}
    assert fresh_weight_sized(probe, leaves["weight"]) == [], "a weight gradient was computed"
    for k in ("hidden", "bias"):
        torch.testing.assert_close(frozen.grads[k], full.grads[k], rtol=0, atol=0)
    frozen.grads["weight"] = full.grads["weight"]  # compare the rest against the reference too
    baseline = eager_baseline(p) if dtype == torch.bfloat16 else None
    assert_matches_reference(p, frozen, baseline=baseline)

    # The probe does see the weight gradient when the weight trains.
    leaves = _leaves(p)
    lp, ent = call_library(p, leaves, backend=backend, chunk_size=p.chunk_size)
    with AllocationProbe() as probe:
        _backprop(leaves, lp, ent, p)
    assert fresh_weight_sized(probe, leaves["weight"]) != []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_frozen_weight(dtype: torch.dtype) -> None:
    frozen_weight_check(dtype, "torch")


def large_offset_check(dtype: torch.dtype, backend: str, offset: float, device: str = "cpu") -> None:
    """All logits shifted by a common ``offset`` (through the bias): log-probs and entropies are
    unchanged in exact arithmetic, and the float tolerance K·(1 + ζ) grows linearly with the
    shift, as the rounding of each shifted logit does (an eager float32 log_softmax, and
    −Σ p (z − lse), are within it). A formula whose error grows like ε·ζ², such as
    lse − Σ_v p_v z_v with Σ_v p_v ≠ 1 by O(εζ), fails it."""
    p = make_problem((3, 7), 12, 90, dtype=dtype, temperature=0.5, chunk_size=5, seed=13, offset=offset)
    p = problem_to(p, device)
    check_problem(p, backend=backend)


@pytest.mark.parametrize("offset", [100.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_large_logit_offset(dtype: torch.dtype, offset: float) -> None:
    large_offset_check(dtype, "torch", offset)


@pytest.mark.parametrize(
    ("bias", "temperature", "with_entropy"),
    [(True, 0.7, True), (False, 1.9, True), (True, 1.0, False)],
)
def test_gradcheck(bias: bool, temperature: float, with_entropy: bool) -> None:
    p = make_problem((5,), 3, 4, dtype=torch.float64, bias=bias, seed=11, ignored=0.0)
    targets = p.targets.clone()
    targets[2] = IGNORE
    inputs = tuple(t.clone().requires_grad_() for t in (p.hidden, p.weight, p.bias) if t is not None)

    def fn(*args: torch.Tensor):  # type: ignore[no-untyped-def]
        return linear_log_probs(
            args[0],
            args[1],
            targets,
            bias=args[2] if bias else None,
            temperature=temperature,
            chunk_size=2,
            backend="torch",
            return_entropy=with_entropy,
        )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_empty_rows() -> None:
    hidden = torch.randn(2, 0, 4, requires_grad=True)
    weight = torch.randn(6, 4)
    targets = torch.zeros(2, 0, dtype=torch.long)
    lp, ent = linear_log_probs(hidden, weight, targets, backend="torch", return_entropy=True)
    assert lp.shape == (2, 0) and ent.shape == (2, 0)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    (grad,) = torch.autograd.grad((lp.sum() + ent.sum()), hidden, allow_unused=True)
    assert grad is None or grad.shape == hidden.shape


def _error_cases() -> list[tuple[str, dict, str]]:
    h = torch.randn(2, 3, 4)
    w = torch.randn(5, 4)
    y = torch.zeros(2, 3, dtype=torch.long)
    base = {"hidden": h, "weight": w, "targets": y}

    def case(msg: str, **kw: object) -> tuple[dict, str]:
        return ({**base, **kw}, msg)

    cases = {
        "weight-3d": case("'weight' must have shape [V, H], got [5, 4, 1]", weight=w.unsqueeze(-1)),
        "weight-1d": case("'weight' must have shape [V, H], got [5]", weight=torch.randn(5)),
        "hidden-width": case(
            "'hidden' must have shape [..., H] with H = 4 (weight is [V, H] = [5, 4]), got [2, 3, 3]",
            hidden=torch.randn(2, 3, 3),
        ),
        "hidden-int": case(
            "'hidden' must be a floating-point tensor", hidden=torch.ones(2, 3, 4, dtype=torch.long)
        ),
        "targets-float": case(
            "'targets' must be an int64 (or int32) tensor, got torch.float32", targets=y.float()
        ),
        "targets-list": case(
            "'targets' must be an int64 (or int32) tensor, got list", targets=[[0, 0, 0]] * 2
        ),
        "targets-shape": case(
            "'targets' must have shape [2, 3] (hidden without its last dim), got [2, 4]",
            targets=torch.zeros(2, 4, dtype=torch.long),
        ),
        "targets-flat": case("'targets' must have shape [2, 3]", targets=torch.zeros(6, dtype=torch.long)),
        "targets-too-big": case(
            "'targets' must be in [0, 5) or equal ignore_index=-100, got 5",
            targets=torch.tensor([[0, 5, 1], [0, 0, 0]]),
        ),
        "targets-negative": case(
            "'targets' must be in [0, 5) or equal ignore_index=-100, got -1",
            targets=torch.tensor([[0, 1, 1], [0, -1, -100]]),
        ),
        "targets-other-ignore": case(
            "'targets' must be in [0, 5) or equal ignore_index=-1, got -100",
            targets=torch.tensor([[0, 1, -1], [0, -100, 0]]),
            ignore_index=-1,
        ),
        "temperature-zero": case("temperature must be in (0.0, inf), got 0.0", temperature=0.0),
        "temperature-negative": case("temperature must be in (0.0, inf), got -1.0", temperature=-1.0),
        "temperature-nan": case("temperature must be", temperature=float("nan")),
        "chunk-string": case("chunk_size must be an integer >= 1, got str '3'", chunk_size="3"),
        "chunk-float": case("chunk_size must be an integer >= 1, got float 2.5", chunk_size=2.5),
        "chunk-bool": case("chunk_size must be an integer >= 1, got bool True", chunk_size=True),
        "backend": case("backend must be one of ['auto', 'torch', 'triton'], got 'cuda'", backend="cuda"),
        "chunk-zero": case("chunk_size must be >= 1, got 0", chunk_size=0),
        "chunk-negative": case("chunk_size must be >= 1, got -3", chunk_size=-3),
        "bias-long": case("'bias' must have shape [V] = [5], got [6]", bias=torch.randn(6)),
        "bias-2d": case("'bias' must have shape [V] = [5], got [1, 5]", bias=torch.randn(1, 5)),
        "dtype-mismatch": case(
            "'hidden' and 'weight' must share a dtype, got torch.float32 and torch.float64", weight=w.double()
        ),
        "dtype-mismatch-bf16": case(
            "'hidden' and 'weight' must share a dtype, got torch.bfloat16 and torch.float32",
            hidden=h.bfloat16(),
        ),
    }
    return [(name, kw, msg) for name, (kw, msg) in cases.items()]


@pytest.mark.parametrize(("name", "kwargs", "message"), _error_cases(), ids=[c[0] for c in _error_cases()])
def test_errors(name: str, kwargs: dict, message: str) -> None:
    kwargs = dict(kwargs)
    hidden, weight, targets = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets")
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        linear_log_probs(hidden, weight, targets, **{"backend": "torch", **kwargs})
    assert str(info.value).startswith("linear_log_probs: ")


# Memory: M = 64 rows ([4, 16]), H = 6, V = 50, chunk 8: chunk·V = 400 ≥ M·H = 384 ≥ V·H = 300,
# and M·V = 3200.
MEM_SHAPE, MEM_WIDTH, MEM_VOCAB, MEM_CHUNK = (4, 16), 6, 50, 8
MEM_ROWS = math.prod(MEM_SHAPE)


def _memory_problem(chunk_size: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Problem:
    return problem_to(
        make_problem(
            MEM_SHAPE, MEM_WIDTH, MEM_VOCAB, dtype=dtype, temperature=0.7, chunk_size=chunk_size, seed=5
        ),
        device,
    )


def test_saved_tensors_are_small() -> None:
    p = _memory_problem(MEM_CHUNK)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    leaves = _leaves(p)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = call_library(p, leaves, backend="torch", chunk_size=MEM_CHUNK)
    assert saved, "the hook saw nothing"
    assert max(saved) < MEM_ROWS * MEM_VOCAB, saved
    # The backward still works from what was saved.
    assert_matches_reference(p, _backprop(leaves, lp, ent, p))

    # The hook does see the [M, V] logits that an unfused computation saves.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        eager_baseline(p)
    assert max(saved) >= MEM_ROWS * MEM_VOCAB


def one_chunk_check(backend: str, chunk: int, device: str = "cpu") -> None:
    """Forward and backward of a float32 problem under the probe: no storage above chunk·V float32
    elements (chunk < M), while chunk = M shows the M×V allocation."""
    p = _memory_problem(chunk, device=device)
    leaves = _leaves(p)
    with AllocationProbe() as probe:
        lp, ent = call_library(p, leaves, backend=backend, chunk_size=chunk)
    forward_max = probe.max_storage()
    with AllocationProbe() as probe:
        got = _backprop(leaves, lp, ent, p)
    backward_ops = {name for name, *_ in probe.outputs}
    assert any("mm" in name for name in backward_ops), f"the probe missed the backward: {backward_ops}"
    backward_max = probe.max_storage()
    bound = chunk * MEM_VOCAB * 4  # bytes of one chunk of float32 logits
    assert bound >= 4 * max(MEM_ROWS * MEM_WIDTH, MEM_VOCAB * MEM_WIDTH) and bound < 4 * MEM_ROWS * MEM_VOCAB
    assert forward_max <= bound, f"forward allocated {forward_max} B > one chunk of logits ({bound} B)"
    assert backward_max <= bound, f"backward allocated {backward_max} B > one chunk of logits ({bound} B)"
    assert_matches_reference(p, got)

    # The probe sees a full [M, V] buffer when one chunk is all the rows.
    p = _memory_problem(MEM_ROWS, device=device)
    leaves = _leaves(p)
    with AllocationProbe() as probe:
        lp, ent = call_library(p, leaves, backend=backend, chunk_size=MEM_ROWS)
        _backprop(leaves, lp, ent, p)
    assert probe.max_storage() >= 4 * MEM_ROWS * MEM_VOCAB


def test_never_more_than_one_chunk_of_logits() -> None:
    one_chunk_check("torch", MEM_CHUNK)


# ---------------------------------------------------------------------------------------------
# Non-finite inputs: banned tokens (−inf bias) and NaN padding (issue 13)
# ---------------------------------------------------------------------------------------------


def with_banned_columns(p: Problem, banned: list[int]) -> tuple[Problem, torch.Tensor]:
    """The problem ``p`` (its vocabulary V) embedded in a vocabulary of V + len(banned) whose
    ``banned`` columns have bias −inf (and random weight rows): a banned token has p = 0, so the
    log-probs, entropies and the gradients of the kept columns are those of ``p`` exactly, and the
    banned columns' weight and bias gradients are 0. Returns (full problem, kept column ids)."""
    vocab = p.weight.shape[0] + len(banned)
    banned_mask = torch.zeros(vocab, dtype=torch.bool)
    banned_mask[banned] = True
    kept = torch.nonzero(~banned_mask).flatten()
    gen = torch.Generator().manual_seed(99)
    weight = torch.randn(vocab, p.weight.shape[1], generator=gen, dtype=torch.float64).to(p.weight.dtype)
    weight[kept] = p.weight
    bias = torch.zeros(vocab, dtype=p.weight.dtype)
    if p.bias is not None:
        bias[kept] = p.bias
    bias[banned_mask] = float("-inf")
    targets = torch.where(p.targets == IGNORE, p.targets, kept[p.targets.clamp(min=0)])
    full = Problem(
        hidden=p.hidden,
        weight=weight,
        bias=bias,
        targets=targets,
        temperature=p.temperature,
        chunk_size=p.chunk_size,
        with_entropy=p.with_entropy,
        grad_lp=p.grad_lp,
        grad_ent=p.grad_ent,
        recipe=p.recipe + f", banned={banned}",
    )
    return full, kept


def banned_token_check(
    dtype: torch.dtype, backend: str, vocab: int, banned: list[int], *, seed: int = 0, device: str = "cpu"
) -> None:
    """−inf in the bias with return_entropy=True: finite entropies and gradients, equal to the
    float64 reference of the same problem without the banned columns (independent: materialised
    logits, log_softmax), and 0 gradient for the banned columns. Also: eager float32
    ``log_softmax`` on the full logits (−inf included) gives finite log-probs and log-prob
    gradients, and so does the library, within float32 rounding of it."""
    kept_vocab = vocab - len(banned)
    p = make_problem((3, 7), 10, kept_vocab, dtype=dtype, temperature=0.7, chunk_size=4, seed=seed)
    full, kept = with_banned_columns(p, banned)
    p, full = problem_to(p, device), problem_to(full, device)
    got = run_library(full, backend=backend)
    assert got.entropy is not None and bool(torch.isfinite(got.entropy).all()), got.entropy
    assert bool(torch.isfinite(got.log_probs).all())
    for k, g in got.grads.items():
        assert bool(torch.isfinite(g).all()), f"d{k} is not finite"
    banned_t = torch.tensor(banned, device=device)
    assert torch.equal(got.grads["weight"][banned_t], torch.zeros_like(got.grads["weight"][banned_t]))
    assert torch.equal(got.grads["bias"][banned_t], torch.zeros_like(got.grads["bias"][banned_t]))
    # the kept columns are exactly the reduced problem: compare with its float64 reference
    reduced = Outcome(
        got.log_probs,
        got.entropy,
        {
            "hidden": got.grads["hidden"],
            "weight": got.grads["weight"][kept.to(device)],
            "bias": got.grads["bias"][kept.to(device)],
        },
    )
    baseline = eager_baseline(p) if dtype == torch.bfloat16 else None
    assert_matches_reference(p, reduced, baseline=baseline)

    # eager float32 log_softmax of the full logits, −inf included, log-probs only
    leaves = {k: v.float().detach().clone().requires_grad_() for k, v in _leaves(full).items()}
    logits = (leaves["hidden"] @ leaves["weight"].T + leaves["bias"]) / full.temperature
    lp_eager, _ = _per_token(torch.log_softmax(logits, dim=-1), full.targets)
    (lp_eager * full.grad_lp.float()).sum().backward()
    only_lp = Problem(**{**full.__dict__, "with_entropy": False})
    lib = run_library(only_lp, backend=backend)
    for k in ("hidden", "weight", "bias"):
        eager_grad = leaves[k].grad
        assert eager_grad is not None and bool(torch.isfinite(eager_grad).all()), k
        assert bool(torch.isfinite(lib.grads[k]).all()), k
    if dtype == torch.float32:
        torch.testing.assert_close(lib.log_probs, lp_eager.detach(), rtol=1e-5, atol=1e-5)
        for k in ("hidden", "weight", "bias"):
            torch.testing.assert_close(lib.grads[k], leaves[k].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("banned", [[3], [0, 1, 2, 40], list(range(0, 60, 2))], ids=["one", "four", "half"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_banned_token_entropy_and_gradients_are_finite(dtype: torch.dtype, banned: list[int]) -> None:
    banned_token_check(dtype, "torch", 60, banned)


def nan_padding_check(dtype: torch.dtype, backend: str, device: str = "cpu") -> None:
    """NaN / ±inf hidden states at ignored targets: outputs and every gradient are bit-identical to
    the same problem with finite values there (padding is inert), and finite; the ignored rows'
    hidden gradient is exactly 0."""
    p = make_problem((4, 6), 9, 45, dtype=dtype, temperature=0.8, chunk_size=5, seed=21, ignored=0.4)
    p = problem_to(p, device)
    ignored = p.targets == IGNORE
    assert 0 < int(ignored.sum()) < p.rows
    clean = run_library(p, backend=backend)
    poison = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype, device=device)
    hidden = p.hidden.clone()
    rows = torch.nonzero(ignored)
    for n, (i, j) in enumerate(rows.tolist()):
        hidden[i, j] = poison[n % 3]
        if n % 4 == 0:
            hidden[i, j, 0] = 1.0  # a partly NaN row
    dirty = run_library(Problem(**{**p.__dict__, "hidden": hidden}), backend=backend)
    assert torch.equal(dirty.log_probs, clean.log_probs)
    assert dirty.entropy is not None and clean.entropy is not None
    assert torch.equal(dirty.entropy, clean.entropy)
    for k, g in dirty.grads.items():
        assert bool(torch.isfinite(g).all()), f"d{k} is not finite with NaN padding"
        assert torch.equal(g, clean.grads[k]), k
    assert bool((dirty.grads["hidden"][ignored] == 0).all())
    assert_matches_reference(p, clean, baseline=eager_baseline(p) if dtype == torch.bfloat16 else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_nan_hidden_at_ignored_targets_is_inert(dtype: torch.dtype) -> None:
    nan_padding_check(dtype, "torch")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not Triton's "0 active drivers": a ValueError that says what the backend needs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(
        ValueError, match=r"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 .*on 'cpu'"
    ):
        linear_log_probs(hidden, weight, torch.zeros(4, dtype=torch.long), backend="triton")
    # "auto" and "torch" are unaffected
    assert linear_log_probs(hidden, weight, torch.zeros(4, dtype=torch.long), backend="auto").shape == (4,)


def test_auto_resolves_to_torch_on_every_device() -> None:
    """Until the Triton kernels have passed on a real GPU, "auto" is the torch backend on CUDA too."""
    from gspo_components.fused import resolve_backend

    for device in ("cpu", "cuda", "meta"):
        assert resolve_backend("auto", torch.device(device)) == "torch", device
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_backend("triton", torch.device("cuda")) == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_auto_backend_on_cuda_is_the_torch_backend() -> None:
    p = make_problem((3, 5), 7, 11, dtype=torch.float32, temperature=0.8, chunk_size=4)
    p = problem_to(p, "cuda")
    auto, torch_ = run_library(p, backend="auto"), run_library(p, backend="torch")
    assert torch.equal(auto.log_probs, torch_.log_probs)
    for k in torch_.grads:
        assert torch.equal(auto.grads[k], torch_.grads[k])


def problem_to(p: Problem, device: str) -> Problem:
    """The same problem with every tensor on ``device``."""
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in p.__dict__.items()}
    return Problem(**fields)
