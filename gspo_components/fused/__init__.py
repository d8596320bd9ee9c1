"""Fused LM head + log-probs: each target token's log-prob without ``[N, V]`` logits.

    linear_log_probs(h, W, y)[n] = log_softmax(h_n Wᵀ / τ + b / τ)[y_n]
                                 = z_{n, y_n} − log Σ_v exp z_{n, v},   z = (h Wᵀ + b) / τ

and, with ``return_entropy=True``, H_n = log Σ_v e^{z_{n,v}} − Σ_v p_{n,v} z_{n,v}.

The policy-gradient losses only need log π(y_t); materialising the logits for 16k tokens and a
152k vocabulary costs about 10 GB in float32 before gradients. Here the logits exist one chunk
(``"torch"``) or one tile (``"triton"``) at a time and are reduced on the fly in float32.

Backends:

- ``"torch"``: chunks of rows through a custom autograd function; CPU and GPU.
- ``"triton"``: a Triton kernel family (CUDA; runs on the CPU under ``TRITON_INTERPRET=1`` for
  tests) with an online log-sum-exp over vocabulary tiles: the forward never writes logits to
  memory; the backward recomputes them tile by tile.
- ``"auto"``: ``"torch"`` everywhere, for now. The Triton kernels have only run under the CPU
  interpreter; until they have passed their tests on a real GPU, ``"auto"`` does not pick them
  on CUDA (see :func:`resolve_backend`). Ask for ``backend="triton"`` explicitly to use them.

Non-finite inputs stay inert, as in eager ``log_softmax``: a −inf logit (a banned token's −inf
bias) gives p = 0 and adds 0 to the entropy and to every gradient (0·(−inf) is taken as 0), and
the hidden rows of ignored targets are read as zeros, so NaN padding reaches no gradient.
"""

from __future__ import annotations

import numbers
import os

import torch

from ..loss._checks import check_float, check_range
from .torch_chunked import ChunkedLinearLogProbs

__all__ = ["BACKENDS", "default_chunk_size", "linear_log_probs", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")
IGNORE_INDEX = -100

# Bytes of float32 logits per chunk. On the CPU, 128 MiB keeps the peak a few percent of eager's
# at the benchmark shape while chunks stay large enough for efficient matmuls (256-row chunks
# were ~25% slower); on the GPU, larger chunks keep each matmul filling the device.
_CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 512 * 2**20}


def default_chunk_size(num_rows: int, vocab_size: int, device: torch.device) -> int:
    """Rows per chunk: a fixed byte budget of float32 logits (128 MiB on CPU, 512 MiB on CUDA)."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    rows = max(1, budget // (4 * max(vocab_size, 1)))
    return int(min(max(rows, 1), max(num_rows, 1)))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for ``backend`` on ``device``: ``"torch"`` or ``"triton"``.

    ``"auto"`` is ``"torch"`` on every device, CUDA included: the Triton kernels have passed
    their tests only under ``TRITON_INTERPRET=1`` on a CPU, never compiled on a GPU, so they are
    not the default until they have. ``"triton"`` needs a CUDA tensor, or ``TRITON_INTERPRET=1``
    set before Triton is imported (the CPU interpreter, for tests); otherwise it is a
    ``ValueError`` (rather than Triton's "0 active drivers").
    """
    where = "linear_log_probs"
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "torch"
    if backend == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not interpret:
            raise ValueError(
                f"{where}: backend='triton' needs a CUDA device or TRITON_INTERPRET=1 (the CPU "
                f"interpreter, set before triton is imported), got tensors on {device.type!r}; use "
                "backend='torch' or 'auto' there"
            )
        if not _triton_available():
            raise ValueError(f"{where}: backend='triton' needs the triton package, which does not import")
    return backend


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: [..., H] final hidden states (any float dtype).
        weight: [V, H] LM-head weight; its gradient is skipped when it does not require grad.
        targets: [...] token ids; entries equal to ``ignore_index`` get log-prob 0, entropy 0 and
            no gradient, whatever their hidden row holds (NaN included).
        temperature: τ > 0, applied to the logits (as the sampler did).
        bias: optional [V]; −inf bans a token (p = 0; entropy and gradients stay finite).
        chunk_size: rows per chunk (``"torch"``) or per launch (``"triton"``); default: see
            :func:`default_chunk_size`.
        backend: ``"auto"`` (currently ``"torch"`` everywhere; see :func:`resolve_backend`),
            ``"torch"`` or ``"triton"`` (CUDA, or the CPU interpreter under TRITON_INTERPRET=1).
        return_entropy: also return the per-token entropy of the tempered distribution.

    Returns:
        float32 log-probs shaped like ``targets`` (float64 for float64 inputs), and the entropies
        of the same shape when ``return_entropy``.
    """
    where = "linear_log_probs"
    hidden = check_float(where, "hidden", hidden)
    weight = check_float(where, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{where}: 'weight' must have shape [V, H], got {list(weight.shape)}")
    vocab, width = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != width:
        raise ValueError(
            f"{where}: 'hidden' must have shape [..., H] with H = {width} (weight is [V, H] = "
            f"{list(weight.shape)}), got {list(hidden.shape)}"
        )
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{where}: 'targets' must be an int64 (or int32) tensor, got {got}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{where}: 'targets' must have shape {list(hidden.shape[:-1])} (hidden without its last "
            f"dim), got {list(targets.shape)}; 'hidden' is {list(hidden.shape)}"
        )
    if bias is not None:
        bias = check_float(where, "bias", bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(
                f"{where}: 'bias' must have shape [V] = [{vocab}], got {list(bias.shape)} "
                f"(V from 'weight' {list(weight.shape)})"
            )
    temperature = check_range(where, "temperature", temperature, 0.0, None, low_inclusive=False)
    backend = resolve_backend(backend, hidden.device)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"{where}: 'hidden' and 'weight' must share a dtype, got {hidden.dtype} and {weight.dtype}"
        )

    batch_shape = targets.shape
    h2 = hidden.reshape(-1, width)
    y = targets.reshape(-1).long()
    valid = y != ignore_index
    out_of_range = valid & ((y < 0) | (y >= vocab))
    if bool(out_of_range.any()):
        bad = int(y[out_of_range][0])
        raise ValueError(
            f"{where}: 'targets' must be in [0, {vocab}) or equal ignore_index={ignore_index}, got {bad}"
        )
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    rows = h2.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(rows, vocab, h2.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise ValueError(
            f"{where}: chunk_size must be an integer >= 1, got {type(chunk_size).__name__} {chunk_size!r}"
        )
    elif int(chunk_size) < 1:
        raise ValueError(f"{where}: chunk_size must be >= 1, got {chunk_size}")
    chunk_size = int(chunk_size)

    if rows == 0:
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        empty = hidden.new_zeros(batch_shape, dtype=out_dtype) + 0.0 * hidden.sum()
        return (empty, empty.clone()) if return_entropy else empty
    if backend == "triton":
        from .triton_backend import TritonLinearLogProbs

        fn = TritonLinearLogProbs.apply
    else:
        fn = ChunkedLinearLogProbs.apply
    log_probs, entropy = fn(
        h2.contiguous(), weight, bias, y_safe, valid, float(temperature), chunk_size, bool(return_entropy)
    )
    log_probs = log_probs.reshape(batch_shape)
    if return_entropy:
        return log_probs, entropy.reshape(batch_shape)
    return log_probs
