"""The Triton backend of :func:`~gspo_components.fused.linear_log_probs`.

Forward (``_forward_kernel``): each program owns ``BLOCK_M`` rows and walks the vocabulary in
``BLOCK_V`` tiles. A tile's logits z = (h Wᵀ + b)/τ are accumulated in float32 registers by
``tl.dot`` over ``BLOCK_K`` slices of the hidden size and folded into an *online* log-sum-exp
(running max m and Σ e^{z−m}, rescaled when m grows; Milakov & Gimelshein 2018), the target
logit, and for the entropy Σ e^{z−m} z. Logits never reach memory; per row it writes lse,
z_y (so log p_y = z_y − lse) and Σ_v p_v z_v (so H = lse − Σ p z).

Backward (``_grad_logits_kernel``): for one chunk of rows it recomputes each tile's logits and
writes the tile's ∂/∂z = g (1[v=y] − p) − g_H p (log p + H), divided by τ, into a chunk buffer;
two library matmuls then give ∂h = ∂Z W and ∂W += ∂Zᵀ h (float32 accumulation), and ∂b the
column sum. Only one chunk of ∂Z is alive at a time.

Non-finite inputs stay inert as in eager ``log_softmax``: the kernels read h = 0 for rows whose
target is ignored (so NaN padding reaches no sum, and the backward's ∂W matmul sees those rows as
zeros), the online log-sum-exp shifts by 0 while a row's running max is still −inf, and the
p·z and p·(log p + H) terms are 0 where p = 0 (a −inf logit from a banned token's −inf bias).

On a CPU the same kernels run under ``TRITON_INTERPRET=1`` (slowly; for tests at small shapes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .torch_chunked import _matmul_f32, live_rows


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    width,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    temperature,
    HAS_BIAS: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """z = (h Wᵀ + b) / τ for a [BLOCK_M, BLOCK_V] tile, accumulated in float32.

    DOT_MODE 0: native tl.dot (bf16/fp16 operands, float32 accumulation); 1: float32 operands in
    IEEE precision (no TF32); 2: half operands upcast to float32 first — used under the
    interpreter, whose tl.dot misreads bf16 operands. bf16 × bf16 products are exact in float32,
    so mode 2 computes the same products as mode 0.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    for k0 in range(0, width, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < width
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if DOT_MODE == 0:
            acc += tl.dot(h, tl.trans(w))
        elif DOT_MODE == 1:
            acc += tl.dot(h, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc / temperature


@triton.jit
def _forward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    valid_ptr,
    lse_ptr,
    target_ptr,
    pz_ptr,
    num_rows,
    vocab,
    width,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    temperature,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    # rows of ignored targets read h = 0, so NaN padding never enters a sum
    live = row_ok & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    run_pz = tl.zeros((BLOCK_M,), tl.float32)
    target = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            live,
            col_ok,
            width,
            stride_hm,
            stride_hk,
            stride_wv,
            stride_wk,
            temperature,
            HAS_BIAS,
            DOT_MODE,
            BLOCK_M,
            BLOCK_V,
            BLOCK_K,
        )
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # While every logit seen is −inf (banned tokens through a −inf bias), shift by 0, not by
        # −inf: −inf − (−inf) would be NaN. e^{−inf} = 0 keeps the sums exact either way.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        e = tl.exp(z - shift[:, None])
        run_sum = run_sum * rescale + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            # p·z is 0 where p = 0 (a −inf logit), not 0·(−inf) = NaN
            run_pz = run_pz * rescale + tl.sum(e * tl.where(e > 0.0, z, 0.0), axis=1)
        run_max = new_max
        target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(target_ptr + rows, target, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(pz_ptr + rows, run_pz / run_sum, mask=row_ok)


@triton.jit
def _grad_logits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    valid_ptr,
    lse_ptr,
    ent_ptr,
    g_ptr,
    gh_ptr,
    dz_ptr,
    num_rows,
    vocab,
    width,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_dm,
    temperature,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < num_rows
    col_ok = cols < vocab
    live = row_ok & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    z = _logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows,
        cols,
        live,
        col_ok,
        width,
        stride_hm,
        stride_hk,
        stride_wv,
        stride_wk,
        temperature,
        HAS_BIAS,
        DOT_MODE,
        BLOCK_M,
        BLOCK_V,
        BLOCK_K,
    )
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    dz = tl.where(cols[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
    if WITH_ENTROPY:
        gh = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        # p (log p + H) is 0 where p = 0 (a −inf logit), not 0·(−inf) = NaN
        dz -= gh[:, None] * p * tl.where(p > 0.0, log_p + ent[:, None], 0.0)
    dz = dz / temperature
    tl.store(
        dz_ptr + rows[:, None] * stride_dm + cols[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _dot_mode(hidden: torch.Tensor) -> int:
    if hidden.dtype == torch.float32:
        return 1
    return 2 if os.environ.get("TRITON_INTERPRET") == "1" else 0


def _blocks(num_rows: int, width: int, on_gpu: bool) -> tuple[int, int, int]:
    if on_gpu:
        return 64, 128, 64
    # Interpreter: the smallest tiles tl.dot accepts keep CPU tests fast.
    return 16, 32, 16


class TritonLinearLogProbs(torch.autograd.Function):
    """Autograd function with the signature of ``ChunkedLinearLogProbs``."""

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
        if hidden.dtype == torch.float64:
            raise ValueError("linear_log_probs: the triton backend takes float32/bf16/fp16, got float64")
        rows, width = hidden.shape
        vocab = weight.shape[0]
        dev = hidden.device
        lse = torch.empty(rows, dtype=torch.float32, device=dev)
        target = torch.empty(rows, dtype=torch.float32, device=dev)
        pz = torch.empty(rows if with_entropy else 1, dtype=torch.float32, device=dev)
        bm, bv, bk = _blocks(rows, width, hidden.is_cuda)
        bias_arg = bias if bias is not None else lse  # unused pointer when HAS_BIAS is False
        valid_i8 = valid.to(torch.int8)  # bytes, not i1 pointers, for the kernels
        _forward_kernel[(triton.cdiv(rows, bm),)](
            hidden,
            weight,
            bias_arg,
            targets,
            valid_i8,
            lse,
            target,
            pz,
            rows,
            vocab,
            width,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            temperature,
            HAS_BIAS=bias is not None,
            WITH_ENTROPY=with_entropy,
            DOT_MODE=_dot_mode(hidden),
            BLOCK_M=bm,
            BLOCK_V=bv,
            BLOCK_K=bk,
        )
        log_probs = torch.where(valid, target - lse, 0.0)
        entropy = torch.where(valid, lse - pz, 0.0) if with_entropy else lse.new_zeros(0)
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        return log_probs, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_log_probs: torch.Tensor | None,
        grad_entropy: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        rows, width = hidden.shape
        vocab = weight.shape[0]
        dev = hidden.device
        use_entropy = bool(ctx.with_entropy and grad_entropy is not None)
        g = torch.zeros(rows, dtype=torch.float32, device=dev)
        if grad_log_probs is not None:
            g = torch.where(valid, grad_log_probs.float(), 0.0)
        gh = torch.where(valid, grad_entropy.float(), 0.0) if use_entropy else g
        ent = entropy if use_entropy else lse
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
        bm, bv, bk = _blocks(rows, width, hidden.is_cuda)
        chunk = max(bm, (ctx.chunk_size // bm) * bm)
        valid_i8 = valid.to(torch.int8)
        dz = torch.empty(min(chunk, rows), vocab, dtype=hidden.dtype, device=dev)
        bias_arg = bias if bias is not None else lse
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            n = stop - start
            h_c = live_rows(hidden[start:stop], valid[start:stop])  # NaN padding: 0, not 0·NaN in ∂W
            dz_c = dz[:n]
            grid = (triton.cdiv(n, bm), triton.cdiv(vocab, bv))
            _grad_logits_kernel[grid](
                h_c,
                weight,
                bias_arg,
                targets[start:stop],
                valid_i8[start:stop],
                lse[start:stop],
                ent[start:stop],
                g[start:stop],
                gh[start:stop],
                dz_c,
                n,
                vocab,
                width,
                h_c.stride(0),
                h_c.stride(1),
                weight.stride(0),
                weight.stride(1),
                dz_c.stride(0),
                ctx.temperature,
                HAS_BIAS=bias is not None,
                WITH_ENTROPY=use_entropy,
                DOT_MODE=_dot_mode(hidden),
                BLOCK_M=bm,
                BLOCK_V=bv,
                BLOCK_K=bk,
            )
            if grad_h is not None:
                grad_h[start:stop] = dz_c @ weight
            if grad_w is not None:
                grad_w += _matmul_f32(dz_c.t(), h_c)
            if grad_b is not None:
                grad_b += dz_c.float().sum(0)
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
