"""The chunked torch backend of :func:`~gspo_components.fused.linear_log_probs`.

Rows are processed ``chunk_size`` at a time: a chunk's logits z = (h Wᵀ + b)/τ are formed in
float32, reduced to log-sum-exp, target logit and (optionally) entropy, and dropped. Only the
per-row log-sum-exp (and entropy) is kept for the backward pass, which recomputes each chunk's
logits (into one reused buffer, transformed in place) and applies

    ∂ log p_y / ∂z_v = 1[v = y] − p_v,        ∂H / ∂z_v = −p_v (log p_v + H),

then ∂/∂h = (∂/∂z) W / τ, ∂/∂W = (∂/∂z)ᵀ h / τ, ∂/∂b = Σ_rows ∂/∂z / τ. At most one chunk of
logits is alive at any time (two while the entropy's gradient is formed).

Two guards keep non-finite inputs inert, as eager ``log_softmax`` does:

- a logit of −inf (a banned token, through a −inf bias) has p = 0, and its terms p·z in the
  entropy and p·(log p + H) in the entropy's gradient are 0 (the limit p log p → 0), not
  0·(−inf) = NaN: shifted logits below the log of the dtype's smallest positive number, where
  e^z is exactly 0, are clamped to that floor before they multiply anything;
- the hidden rows of ignored targets are replaced by zeros, one chunk at a time, before any
  matmul, so NaN or ±inf there (padding) cannot reach ∂W, ∂b or ∂h through 0·NaN.
"""

from __future__ import annotations

import math

import torch


def log_floor(dtype: torch.dtype) -> float:
    """A shifted logit (or log-prob) below which e^z is exactly 0 in ``dtype``: the log of its
    smallest positive (subnormal) number, minus a margin."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return math.log(tiny) - 8.0


def live_rows(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``hidden`` with the rows of ignored targets set to 0 (so NaN padding stays inert)."""
    return torch.where(valid.unsqueeze(1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


def _matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result. On CUDA, half inputs accumulate and return in float32
    (``out_dtype``); elsewhere the product is formed in the inputs' dtype, then upcast."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    out = a @ b
    return out if out.dtype == torch.float64 else out.float()


def chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """z = (h Wᵀ + b) / τ for one chunk, in float32 (float64 for float64 inputs).

    With ``out`` (a float buffer of the right shape), z is written there and no chunk-sized
    tensor is allocated when the inputs are float32/float64: on the CPU, allocating and
    page-faulting a fresh chunk every time costs as much as the arithmetic.
    """
    if out is not None and hidden.dtype == out.dtype:
        z = torch.mm(hidden, weight.t(), out=out)
    elif out is not None:
        z = out.copy_(_matmul_f32(hidden, weight.t()))
    else:
        z = _matmul_f32(hidden, weight.t())
    if bias is not None:
        z.add_(bias.to(z.dtype))
    if temperature != 1.0:
        z.div_(temperature)
    return z


class ChunkedLinearLogProbs(torch.autograd.Function):
    """Autograd function: (h [M, H], W [V, H], b [V] | None, y [M]) → (log p_y [M], H [M]).

    Each pass reuses one chunk-sized float buffer and transforms it in place (logits → shifted
    logits → probabilities → gradient), so the peak extra memory is about one chunk of logits
    (two when the entropy's gradient is needed).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        valid: torch.Tensor,
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = hidden.shape[0]
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        log_probs = torch.zeros(m, dtype=out_dtype, device=hidden.device)
        entropy = torch.zeros(m if with_entropy else 0, dtype=out_dtype, device=hidden.device)
        lse = torch.empty(m, dtype=out_dtype, device=hidden.device)
        buf = torch.empty(min(chunk_size, m), weight.shape[0], dtype=out_dtype, device=hidden.device)
        floor = log_floor(out_dtype)
        for start in range(0, m, chunk_size):
            stop = min(start + chunk_size, m)
            h_c = live_rows(hidden[start:stop], valid[start:stop])
            z = chunk_logits(h_c, weight, bias, temperature, out=buf[: stop - start])
            target_logit = z.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1)
            row_max = z.amax(dim=-1, keepdim=True)
            z.sub_(row_max)  # z − max ≤ 0
            if with_entropy:
                # H = log s − Σ e (z − max) / s with e = exp(z − max), s = Σ e: every term is
                # bounded, so the rounding stays at ε·|z|, not ε·|z|² as lse − Σ p z would give.
                # Clamping where e^z is already 0 turns −inf logits' 0·(−inf) into 0·floor = 0.
                z.clamp_(min=floor)
                e = torch.exp(z)
                s = e.sum(-1)
                e_dot_z = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).reshape(-1)  # Σ_v e z, no temp
                h = torch.log(s) - e_dot_z / s
                del e
                entropy[start:stop] = torch.where(valid[start:stop], h, 0.0)
            else:
                s = z.exp_().sum(-1)
            row_lse = row_max.squeeze(1) + torch.log(s)
            lse[start:stop] = row_lse
            log_probs[start:stop] = torch.where(valid[start:stop], target_logit - row_lse, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        ctx.mark_non_differentiable(lse)
        return log_probs, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_log_probs: torch.Tensor | None,
        grad_entropy: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        tau: float = ctx.temperature
        m = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None
        use_entropy = ctx.with_entropy and grad_entropy is not None
        buf = torch.empty(min(ctx.chunk_size, m), weight.shape[0], dtype=lse.dtype, device=hidden.device)
        floor = log_floor(lse.dtype)
        for start in range(0, m, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, m)
            rows_valid = valid[start:stop]
            h_c = live_rows(hidden[start:stop], rows_valid)
            dz = chunk_logits(h_c, weight, bias, tau, out=buf[: stop - start])
            dz.sub_(lse[start:stop].unsqueeze(1))  # log p
            g = torch.zeros(stop - start, dtype=dz.dtype, device=dz.device)
            if grad_log_probs is not None:
                g = torch.where(rows_valid, grad_log_probs[start:stop].to(dz.dtype), 0.0)
            if use_entropy:
                # dz = −p (g + g_H (log p + H)) + g·1[v = y]
                gh = torch.where(rows_valid, grad_entropy[start:stop].to(dz.dtype), 0.0)
                dz.clamp_(min=floor)  # p = 0 there either way; keeps p·(log p + H) at 0, not NaN
                p = torch.exp(dz)
                dz.add_(entropy[start:stop].unsqueeze(1)).mul_(gh.unsqueeze(1)).add_(g.unsqueeze(1))
                dz.mul_(p).neg_()
                del p
            else:
                dz.exp_().mul_(-g.unsqueeze(1))  # −g p
            dz.scatter_add_(1, targets[start:stop].unsqueeze(1), g.unsqueeze(1))
            if tau != 1.0:
                dz.div_(tau)
            if grad_b is not None:
                grad_b += dz.sum(0).to(acc_dtype)
            dz_in = dz if dz.dtype == hidden.dtype else dz.to(hidden.dtype)
            if grad_h is not None:
                torch.mm(dz_in, weight, out=grad_h[start:stop])
            if grad_w is not None:
                if dz_in.dtype == acc_dtype:
                    grad_w.addmm_(dz_in.t(), h_c)
                else:
                    grad_w += _matmul_f32(dz_in.t(), h_c)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )
