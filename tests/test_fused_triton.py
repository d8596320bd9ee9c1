"""Fused log-probs tests for ``linear_log_probs(backend="triton")`` (property 15 of docs/algorithms.md).

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py before the kernel
module is imported) on CPU tensors; with one, every test here runs the compiled kernels on CUDA
tensors (``DEVICE``). The shapes are small for the interpreter: M ≤ 40, H ≤ 48, V ≤ 100 (the interpreter's tiles
are BLOCK_M = 16, BLOCK_V = 32, BLOCK_K = 16, so most drawn V and H are not tile multiples). The
references, tolerances and probes are those of test_fused.py (independent float64 computations;
see its docstring).

Proves, for ``backend="triton"``:

- ``test_triton_matches_float64_reference`` (hypothesis, float32 and bf16): values, entropies and
  gradients wrt hidden, weight and bias equal the float64 reference over drawn shapes, chunk
  sizes, temperatures, bias or none and ignored targets (none, some, all), with float32 outputs
  and exact zeros (values, entropies, hidden-gradient rows) at ignored targets;
- ``test_triton_fixed_cases``: the same at chosen shapes that pin the tile edges: V = 77 and 100
  (partial last tile), V = 32 (exactly one tile), V = 1, H = 17 and 48 (partial/whole K slices),
  M = 33 and 40 (a partial row block) with chunk sizes 1, 16, 20 (not a multiple of BLOCK_M) and
  None, τ ≠ 1, bias, entropy and ignored targets including all of them;
- ``test_triton_large_logit_offset``: with every logit shifted by 100 or 1000 (through the bias)
  the float32 log-probs, entropies and gradients stay within the tolerance that grows linearly
  with the logit magnitude (see ``large_offset_check`` in test_fused.py);
- ``test_triton_rejects_float64``: float64 inputs raise ValueError;
- ``test_triton_frozen_weight``: a frozen weight gets no gradient buffer ([V, H]) in the backward,
  and hidden/bias gradients are unchanged and correct;
- ``test_triton_never_more_than_one_chunk_of_logits``: the forward never stores logits (no storage
  above the inputs), the backward holds at most one chunk (16 rows) of ∂Z, and the probe sees an
  M×V buffer when the chunk is all M rows;
- ``test_triton_banned_token``: a −inf bias (one column; a whole first vocabulary tile of 32, so
  a row's running max is −inf for a whole tile) with ``return_entropy=True`` gives finite
  entropies and gradients equal to the reference without the banned columns, and zero gradient
  for the banned columns (see ``banned_token_check`` in test_fused.py);
- ``test_triton_nan_hidden_at_ignored_targets``: NaN / ±inf hidden rows at ignored targets change
  no output and no gradient bit, and every gradient is finite;
- ``test_triton_on_cuda_matches_eager`` (only with a CUDA GPU; skipped otherwise): the compiled
  kernels, not the interpreter, against the float64 reference and the eager float32
  ``log_softmax``, at the interpreter's shapes and at a shape of several GPU tiles.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fused import (
    banned_token_check,
    check_problem,
    frozen_weight_check,
    large_offset_check,
    make_problem,
    nan_padding_check,
    one_chunk_check,
    problem_to,
    problems,
    run_library,
)

from gspo_components.fused import linear_log_probs

DTYPES = [torch.float32, torch.bfloat16]
# With a GPU the compiled kernels run on CUDA tensors; without one, the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=15)
@given(data=st.data())
def test_triton_matches_float64_reference(dtype: torch.dtype, data: st.DataObject) -> None:
    p = data.draw(problems(dtype=dtype, max_rows=40, max_width=48, max_vocab=100))
    check_problem(problem_to(p, DEVICE), backend="triton")


FIXED_CASES = {
    # name: (leading shape, H, V, keyword arguments of make_problem)
    "V77-H17-chunk16": ((33,), 17, 77, {"temperature": 0.45, "chunk_size": 16, "ignored": 0.3}),
    "V100-H48-chunk20": ((4, 10), 48, 100, {"temperature": 2.5, "chunk_size": 20, "scale": 5.0}),
    "V32-H16-chunk1": ((2, 3), 16, 32, {"temperature": 0.8, "chunk_size": 1, "bias": False}),
    "V1-H3": ((5,), 3, 1, {"temperature": 1.3, "ignored": 0.3}),
    "all-ignored": ((3, 6), 9, 45, {"temperature": 0.6, "chunk_size": 16, "ignored": 1.0}),
    "no-entropy": ((33,), 17, 77, {"temperature": 1.0, "with_entropy": False}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(FIXED_CASES))
def test_triton_fixed_cases(case: str, dtype: torch.dtype) -> None:
    shape, width, vocab, kwargs = FIXED_CASES[case]
    p = make_problem(shape, width, vocab, dtype=dtype, seed=7, **kwargs)
    check_problem(problem_to(p, DEVICE), backend="triton")


# Under the numpy interpreter the grad kernel's padded rows (beyond M, masked out of every store)
# see lse = 0 against logits ≈ offset/τ, and exp overflows there; nothing of it reaches an output.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_triton_large_logit_offset(offset: float) -> None:
    large_offset_check(torch.float32, "triton", offset, device=DEVICE)


def test_triton_rejects_float64() -> None:
    hidden = torch.randn(4, 3, dtype=torch.float64, device=DEVICE)
    weight = torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="triton backend takes float32/bf16/fp16, got float64"):
        linear_log_probs(hidden, weight, torch.zeros(4, dtype=torch.long, device=DEVICE), backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_frozen_weight(dtype: torch.dtype) -> None:
    frozen_weight_check(dtype, "triton", device=DEVICE)


def test_triton_never_more_than_one_chunk_of_logits() -> None:
    one_chunk_check("triton", 16, device=DEVICE)


@pytest.mark.parametrize(
    ("vocab", "banned"), [(77, [5]), (77, list(range(32))), (40, [0, 39])], ids=["one", "first-tile", "edges"]
)
def test_triton_banned_token(vocab: int, banned: list[int]) -> None:
    banned_token_check(torch.float32, "triton", vocab, banned, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_nan_hidden_at_ignored_targets(dtype: torch.dtype) -> None:
    nan_padding_check(dtype, "triton", device=DEVICE)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: this checks the compiled Triton kernels, which the CPU interpreter does not run",
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_on_cuda_matches_eager(dtype: torch.dtype) -> None:
    """On a real GPU: the fixed cases, a shape spanning several GPU tiles (BLOCK_M = 64,
    BLOCK_V = 128, BLOCK_K = 64, none of them dividing M, V or H), and the torch backend on the
    same device, against the independent float64 reference (bf16: also eager bf16)."""
    cases = [
        make_problem(shape, width, vocab, dtype=dtype, seed=7, **kw)
        for shape, width, vocab, kw in FIXED_CASES.values()
    ]
    cases.append(make_problem((3, 101), 200, 1000, dtype=dtype, seed=3, temperature=0.7, chunk_size=130))
    cases.append(make_problem((300,), 96, 4099, dtype=dtype, seed=4, scale=5.0, ignored=0.1))
    for p in cases:
        p = problem_to(p, "cuda")
        check_problem(p, backend="triton")
        got, ref = run_library(p, backend="triton"), run_library(p, backend="torch")
        assert got.log_probs.device.type == "cuda"
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(
            got.log_probs, ref.log_probs, rtol=tol, atol=tol * (1 + float(ref.log_probs.abs().max()))
        )
    banned_token_check(torch.float32, "triton", 300, list(range(128)), device="cuda")  # a whole GPU tile
    nan_padding_check(dtype, "triton", device="cuda")
