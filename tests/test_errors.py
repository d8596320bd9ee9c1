"""Validation tests: validation at the module boundary (docs/concepts.md, "Padding and dtype rules").

Proves that each malformed input in a table raises ``ValueError`` whose message names the key or
argument, states what was expected and says what came; and that valid but unusual inputs (0/1
integer and float masks, bf16 log-probs) are accepted and give the same results as the usual ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from tensordict import TensorDict

from gspo_components import (
    CISPOClip,
    GroupNormalizedAdvantage,
    LeaveOneOutAdvantage,
    Objective,
    PerTokenAdvantage,
    PPOClip,
    RolloutCorrection,
    SAPOGate,
    SequenceLogRatio,
    TokenLogRatio,
    aggregate,
    group_normalized_advantages,
    grpo,
    gspo,
    local_normalizers,
    ppo_clip_loss,
    step_normalizers,
)

N, T = 4, 7


def policy_td(**changes: object) -> TensorDict:
    """A valid policy batch [4, 7] (float32, bool mask, lengths 7, 3, 5, 1), with entries
    replaced (or removed, for the value None) by ``changes``."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(T)[None] < torch.tensor([7, 3, 5, 1])[:, None]
    lp = -torch.rand(N, T, generator=gen)
    entries: dict[str, object] = {
        "log_probs": lp,
        "old_log_probs": lp - 0.01 * torch.randn(N, T, generator=gen),
        "ref_log_probs": lp + 0.1,
        "rollout_log_probs": lp - 0.02,
        "advantages": torch.randn(N, generator=gen),
        "response_mask": mask,
    }
    for key, value in changes.items():
        if value is None:
            entries.pop(key)
        else:
            entries[key] = value
    td = TensorDict({}, batch_size=[N])
    for key, value in entries.items():
        td.set(key, value)  # type: ignore[arg-type]
    return td


def reward_td(rewards: object = None, group_ids: object = None, n: int = N) -> TensorDict:
    td = TensorDict({}, batch_size=[n])
    td.set("rewards", rewards if rewards is not None else torch.tensor([1.0, 0.0, 0.5, 0.5])[:n])  # type: ignore[arg-type]
    td.set("group_ids", group_ids if group_ids is not None else torch.tensor([0, 0, 1, 1])[:n])  # type: ignore[arg-type]
    return td


def padded_td() -> TensorDict:
    return policy_td(response_mask=torch.zeros(N, T, dtype=torch.bool))


def _token_loss_td(**changes: object) -> TensorDict:
    td = policy_td(**changes)
    return PPOClip()(TokenLogRatio()(td))


# (id, thunk that must raise, fragments the message must contain: the who, the expectation, what came)
CASES: list[tuple[str, Callable[[], object], tuple[str, ...]]] = [
    (
        "missing-key",
        lambda: TokenLogRatio()(policy_td(old_log_probs=None)),
        ("TokenLogRatio", "missing key 'old_log_probs'", "the TensorDict holds", "'log_probs'"),
    ),
    (
        "missing-renamed-key",
        lambda: TokenLogRatio(in_keys={"log_probs": ("policy", "lp")})(policy_td()),
        ("missing key ('policy', 'lp')", "its 'log_probs' input"),
    ),
    (
        "old-log-probs-wrong-shape",
        lambda: SequenceLogRatio()(policy_td(old_log_probs=torch.zeros(N, T - 1))),
        (
            "sequence_log_ratio",
            "'old_log_probs' must have shape [N, T] = [4, 7]",
            "like 'response_mask'",
            "got [4, 6]",
        ),
    ),
    (
        # a TensorDict of batch size [4] refuses a [5] entry itself, so this case goes through the
        # pure function, which a trainer without TensorDict calls directly
        "advantages-N+1",
        lambda: ppo_clip_loss(torch.zeros(N, T), torch.zeros(N + 1), torch.ones(N, T, dtype=torch.bool)),
        ("ppo_clip_loss", "'advantages' must have shape [N] = [4] or [N, T] = [4, 7]", "got [5]"),
    ),
    (
        "advantages-N-T+1",
        lambda: PPOClip()(TokenLogRatio()(policy_td(advantages=torch.zeros(N, T + 1)))),
        ("ppo_clip_loss", "'advantages' must have shape [N] = [4] or [N, T] = [4, 7]", "got [4, 8]"),
    ),
    (
        "int-log-probs",
        lambda: TokenLogRatio()(policy_td(log_probs=torch.zeros(N, T, dtype=torch.long))),
        ("'log_probs' must be a floating-point tensor", "got torch.int64"),
    ),
    (
        "mask-value-2",
        lambda: TokenLogRatio()(policy_td(response_mask=torch.full((N, T), 2))),
        ("'response_mask' must be bool or hold only 0 and 1", "got torch.int64 with other values"),
    ),
    (
        "float-mask-0.5",
        lambda: gspo().loss(policy_td(response_mask=torch.full((N, T), 0.5))),
        ("'response_mask' must be bool or hold only 0 and 1", "got torch.float32 with other values"),
    ),
    (
        "mask-1d",
        lambda: aggregate(
            torch.zeros(N, T),
            torch.ones(N, dtype=torch.bool),
            "token-mean",
            local_normalizers(torch.ones(N, T, dtype=torch.bool)),
        ),
        ("aggregate", "'response_mask' must have shape [N, T]", "got [4]"),
    ),
    (
        "all-padding-batch",
        lambda: Objective()(_token_loss_td(response_mask=torch.zeros(N, T, dtype=torch.bool))),
        ("Objective", "'response_mask' selects no token", "all-padding batch of shape [4, 7]"),
    ),
    ("eps-low-1", lambda: PPOClip(eps_low=1.0), ("PPOClip", "eps_low must be in [0.0, 1.0)", "got 1.0")),
    ("eps-low-negative", lambda: grpo(eps_low=-0.1), ("eps_low must be in [0.0, 1.0)", "got -0.1")),
    ("eps-high-negative", lambda: PPOClip(eps_high=-0.2), ("eps_high must be in [0.0, inf)", "got -0.2")),
    (
        "cispo-eps-high-negative",
        lambda: CISPOClip(-0.01),
        ("CISPOClip", "eps_high must be in [0.0, inf)", "got -0.01"),
    ),
    ("dual-clip-1", lambda: PPOClip(dual_clip=1.0), ("dual_clip must be in (1.0, inf)", "got 1.0")),
    ("dual-clip-below-1", lambda: grpo(dual_clip=0.5), ("dual_clip must be in (1.0, inf)", "got 0.5")),
    (
        "unknown-aggregation",
        lambda: Objective("token-sum"),
        ("Objective", "aggregation must be one of ['token-mean', 'seq-mean-token-mean'", "got 'token-sum'"),
    ),
    (
        "unknown-kl-estimator",
        lambda: grpo(kl_coef=0.1, kl_estimator="k4"),
        ("kl_estimator must be one of ['k1', 'k2', 'k3']", "got 'k4'"),
    ),
    ("kl-coef-negative", lambda: Objective(kl_coef=-0.1), ("kl_coef must be in [0.0, inf)", "got -0.1")),
    (
        "kl-without-ref-log-probs",
        lambda: grpo(kl_coef=0.04).loss(policy_td(ref_log_probs=None)),
        ("Objective", "missing key 'ref_log_probs'", "its 'ref_log_probs' input"),
    ),
    (
        "group-ids-float",
        lambda: GroupNormalizedAdvantage()(reward_td(group_ids=torch.tensor([0.0, 0.0, 1.0, 1.0]))),
        ("'group_ids' must be an integer tensor of shape [N]", "got torch.float32"),
    ),
    (
        "group-ids-wrong-length",
        lambda: LeaveOneOutAdvantage()(reward_td(group_ids=torch.tensor([[0], [0], [1], [1]]))),
        ("'group_ids' must have shape [N] = [4] like 'rewards'", "got [4, 1]"),
    ),
    (
        "group-ids-length-3",
        lambda: group_normalized_advantages(torch.ones(N), torch.tensor([0, 0, 1])),
        ("'group_ids' must have shape [N] = [4] like 'rewards'", "got [3]"),
    ),
    (
        "rewards-N-1",
        lambda: GroupNormalizedAdvantage()(reward_td(rewards=torch.ones(N, 1))),
        ("'rewards' must have shape [N]", "got [4, 1]"),
    ),
    (
        "empty-rewards",
        lambda: GroupNormalizedAdvantage()(reward_td(torch.zeros(0), torch.zeros(0, dtype=torch.long), n=0)),
        ("'rewards' is empty", "shape [0]"),
    ),
    (
        "non-finite-reward",
        lambda: GroupNormalizedAdvantage()(reward_td(rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0]))),
        ("'rewards' holds NaN or ±inf for a valid sample", "'reward_valid'"),
    ),
    (
        "reward-valid-not-bool",
        lambda: GroupNormalizedAdvantage()(reward_td().set("reward_valid", torch.ones(N, dtype=torch.long))),
        ("'reward_valid' must be a bool tensor of shape [4]", "got torch.int64 [4]"),
    ),
    (
        "advantage-eps-negative",
        lambda: GroupNormalizedAdvantage(eps=-1e-6),
        ("eps must be in [0.0, inf)", "got -1e-06"),
    ),
    (
        "non-tensordict-module",
        lambda: TokenLogRatio()({"log_probs": torch.zeros(N, T)}),
        ("TokenLogRatio: expects a TensorDict", "got dict"),
    ),
    (
        "non-tensordict-recipe",
        lambda: grpo().loss(torch.zeros(N, T)),
        ("PolicyLoss: expects a TensorDict of batch size [N]", "got Tensor"),
    ),
    (
        "in-keys-unknown-name",
        lambda: SequenceLogRatio(in_keys={"logprobs": "lp"}),
        (
            "SequenceLogRatio",
            "in_keys has no entry named ['logprobs']",
            "its entries are ['log_probs', 'old_log_probs', 'response_mask']",
        ),
    ),
    (
        "out-keys-unknown-name",
        lambda: PerTokenAdvantage(out_keys={"advantage": "a"}),
        ("out_keys has no entry named ['advantage']", "its entries are ['advantages']"),
    ),
    (
        "out-keys-collide",  # the renamed loss would be overwritten by the detached policy-loss metric
        lambda: Objective(out_keys={"loss": "policy_loss"}),
        ("Objective: out_keys would write both 'loss' and 'policy_loss' to 'policy_loss'",),
    ),
    (
        "in-keys-sequence-wrong-length",
        lambda: TokenLogRatio(in_keys=["lp", "old"]),
        (
            "in_keys given as a sequence must list 3 keys in the order ['log_probs', 'old_log_probs', 'response_mask']",
            "got 2: ['lp', 'old']",
        ),
    ),
    (
        "rollout-lower-with-truncate",
        lambda: RolloutCorrection(mode="truncate", lower=0.5),
        ("RolloutCorrection", "lower applies to mode='mask' only", "got mode='truncate' with lower=0.5"),
    ),
    (
        "rollout-unknown-level",
        lambda: RolloutCorrection(level="sequence"),
        ("level must be one of ['token', 'sequence-product', 'sequence-geometric']", "got 'sequence'"),
    ),
    ("rollout-upper-zero", lambda: RolloutCorrection(upper=0.0), ("upper must be in (0.0, inf)", "got 0.0")),
    (
        "rollout-lower-above-upper",
        lambda: RolloutCorrection(mode="mask", upper=2.0, lower=3.0),
        ("lower must be in [0.0, 2.0)", "got 3.0"),
    ),
    (
        "step-normalizers-all-padding",
        lambda: step_normalizers([padded_td(), padded_td()]),
        ("step_normalizers", "'response_mask' selects no token in any micro-batch"),
    ),
    ("step-normalizers-empty", lambda: step_normalizers([]), ("step_normalizers: no micro-batch was given",)),
    (
        "step-normalizers-missing-mask",
        lambda: step_normalizers([policy_td(response_mask=None)]),
        ("step_normalizers: a micro-batch has no key 'response_mask'",),
    ),
    (
        "normalizers-wrong-type",
        lambda: grpo().loss(policy_td(), normalizers=(10, 4, 7)),  # type: ignore[arg-type]
        ("normalizers must be a LossNormalizers", "got tuple"),
    ),
    ("max-length-zero", lambda: Objective(max_length=0), ("max_length must be in (0, inf)", "got 0")),
    ("sapo-tau-zero", lambda: SAPOGate(tau_pos=0.0), ("tau_pos must be in (0.0, inf)", "got 0.0")),
    (
        "per-token-advantages-wrong-shape",
        lambda: PerTokenAdvantage()(policy_td(token_advantages=torch.zeros(N, T - 2))),
        ("'token_advantages' must have shape [N, T] = [4, 7] like 'response_mask'", "got [4, 5]"),
    ),
    (
        "kl-ref-wrong-shape",
        lambda: grpo(kl_coef=0.1).loss(policy_td(ref_log_probs=torch.zeros(N, T + 3))),
        ("'ref_log_probs' must have shape [N, T] = [4, 7]", "got [4, 10]"),
    ),
    (
        "rollout-log-probs-int",
        lambda: RolloutCorrection()(policy_td(rollout_log_probs=torch.zeros(N, T, dtype=torch.int32))),
        ("'rollout_log_probs' must be a floating-point tensor", "got torch.int32"),
    ),
]


@pytest.mark.parametrize(("thunk", "fragments"), [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_malformed_input_raises(thunk: Callable[[], object], fragments: tuple[str, ...]) -> None:
    assert fragments, "each case names what its message must say"
    with pytest.raises(ValueError, match=re.escape(fragments[0])) as info:
        thunk()
    message = str(info.value)
    for fragment in fragments[1:]:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 20
    assert len({c[0] for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------
# Valid but unusual inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_dtype", [torch.int64, torch.int32, torch.uint8, torch.float32, torch.float64], ids=str
)
@pytest.mark.parametrize("recipe", [grpo, gspo], ids=["grpo", "gspo"])
def test_zero_one_masks_are_accepted(mask_dtype: torch.dtype, recipe: Callable[[], object]) -> None:
    reference = policy_td()
    bool_mask = reference["response_mask"]
    want = recipe().loss(reference)  # type: ignore[attr-defined]
    got = recipe().loss(policy_td(response_mask=bool_mask.to(mask_dtype)))  # type: ignore[attr-defined]
    for key in ("loss", "clip_fraction", "ratio_mean", "num_tokens"):
        assert torch.equal(got[key], want[key]), key


def test_bf16_inputs_are_accepted() -> None:
    td = policy_td()
    bf16 = policy_td(
        log_probs=td["log_probs"].bfloat16().requires_grad_(True),
        old_log_probs=td["old_log_probs"].bfloat16(),
        ref_log_probs=td["ref_log_probs"].bfloat16(),
        advantages=td["advantages"].bfloat16(),
    )
    out = grpo(kl_coef=0.04).loss(bf16)
    assert out["loss"].dtype == torch.float32 and bool(torch.isfinite(out["loss"]))
    out["loss"].backward()
    assert bf16["log_probs"].grad is not None and bf16["log_probs"].grad.dtype == torch.bfloat16
    # the same values upcast beforehand give the same loss: the arithmetic ran in float32
    upcast = policy_td(
        **{k: bf16[k].detach().float() for k in ("log_probs", "old_log_probs", "ref_log_probs", "advantages")}
    )
    torch.testing.assert_close(out["loss"], grpo(kl_coef=0.04).loss(upcast)["loss"], rtol=0, atol=0)
