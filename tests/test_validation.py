"""The validation switch, and the loss-side findings of issue 13: each input below was accepted
silently (or failed late and obscurely) before; now it is a ValueError naming what was wrong, or
an exact result."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

import gspo_components as gc

INF, NAN = float("inf"), float("nan")


def _td(n: int = 4, t: int = 5, *, lengths=(5, 3, 2, 4), dtype=torch.float32, device="cpu") -> TensorDict:
    mask = torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    old = torch.full((n, t), -1.0, dtype=dtype)
    lp = old + 0.01 * torch.arange(n * t, dtype=dtype).view(n, t) / (n * t)
    return TensorDict(
        {
            "log_probs": lp.to(device),
            "old_log_probs": old.to(device),
            "ref_log_probs": old.to(device),
            "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=dtype).to(device),
            "response_mask": mask.to(device),
            "entropy": torch.linspace(0.1, 2.0, n * t, dtype=dtype).view(n, t).to(device),
            "response_ids": torch.arange(n * t).view(n, t).remainder(5).to(device),
            "group_ids": torch.tensor([0, 0, 1, 1]).to(device),
        },
        batch_size=[n],
        device=None,
    )


# -- the switch ----------------------------------------------------------------------------------


def test_validation_is_on_by_default_and_the_context_manager_restores_it() -> None:
    assert gc.is_validating()
    with gc.validation(False):
        assert not gc.is_validating()
        with gc.validation(True):
            assert gc.is_validating()
        assert not gc.is_validating()
    assert gc.is_validating()
    gc.set_validation(False)
    try:
        assert not gc.is_validating()
    finally:
        gc.set_validation(True)
    with pytest.raises(ValueError, match="enabled must be a bool"):
        gc.set_validation("no")  # type: ignore[arg-type]


def test_value_checks_are_skipped_with_validation_off() -> None:
    td = _td()
    td["response_mask"] = td["response_mask"].float() * 2  # not 0/1: an error only when validating
    with pytest.raises(ValueError, match=r"response_mask.*only 0 and 1"):
        gc.grpo().loss(td)
    with gc.validation(False):
        out = gc.grpo().loss(td)  # read as mask != 0
    assert torch.isfinite(out["loss"])


def test_all_padding_batch_without_validation_gives_an_exact_zero() -> None:
    td = _td(lengths=(0, 0, 0, 0))
    with pytest.raises(ValueError, match="selects no token"):
        gc.gspo().loss(td)
    with gc.validation(False):
        out = gc.gspo().loss(td)
    assert out["loss"].item() == 0.0


# -- non-finite valid inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(gc.RECIPES))
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
@pytest.mark.parametrize("key", ["log_probs", "old_log_probs"])
def test_non_finite_valid_log_prob_is_an_error(name: str, bad: float, key: str) -> None:
    """Before: +inf gave a finite loss, NaN a NaN loss with a silently zero gradient."""
    td = _td()
    td[key][1, 2] = bad  # row 1 has 3 valid tokens: position 2 is valid
    with pytest.raises(ValueError, match=r"'log_probs' and 'old_log_probs' at valid positions.*finite"):
        getattr(gc, name)().loss(td)
    td[key][1, 2] = -1.0
    td[key][1, 4] = bad  # padding: inert, no error
    assert torch.isfinite(getattr(gc, name)().loss(td)["loss"])


def test_non_finite_valid_log_prob_in_the_pure_functions() -> None:
    mask = torch.tensor([[True, True, False]])
    lp = torch.tensor([[-1.0, INF, NAN]])
    old = torch.tensor([[-1.0, -1.0, NAN]])
    for fn in (
        gc.token_log_ratio,
        gc.sequence_log_ratio,
        gc.sequence_token_log_ratio,
        gc.sequence_mean_log_ratio,
    ):
        with pytest.raises(ValueError, match=fn.__name__):
            fn(lp, old, mask)
    with pytest.raises(ValueError, match="ref_log_probs"):
        gc.kl_penalty(old, lp, mask)


@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_non_finite_advantages_are_an_error(bad: float) -> None:
    """Before: NaN or ±inf advantages reached the loss unchecked."""
    td = _td()
    td["advantages"][2] = bad
    with pytest.raises(ValueError, match="'advantages'"):
        gc.grpo().loss(td)
    with pytest.raises(ValueError, match="'advantages'"):
        gc.ppo_clip_loss(torch.zeros(4, 5), td["advantages"], td["response_mask"])
    token_adv = torch.ones(4, 5)
    token_adv[1, 1] = bad
    td["advantages"] = token_adv
    with pytest.raises(ValueError, match="'advantages' at valid positions"):
        gc.gspo_token().loss(td)
    token_adv[1, 1] = 1.0
    token_adv[1, 4] = bad  # padding
    assert torch.isfinite(gc.gspo_token().loss(td)["loss"])


def test_an_empty_rows_advantage_is_inert() -> None:
    td = _td(lengths=(5, 0, 2, 4))
    td["advantages"][1] = NAN  # a filtered sample
    out = gc.grpo().loss(td)
    assert torch.isfinite(out["loss"])


# -- hyper-parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (
            lambda: gc.objective_loss(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), max_length=INF),
            "max_length",
        ),
        (lambda: gc.grpo(kl_coef=INF), "kl_coef must be a finite number"),
        (lambda: gc.grpo(kl_coef=NAN), "kl_coef must be a finite number"),
        (lambda: gc.dr_grpo(max_length=2.9), "max_length must be an integer"),
        (lambda: gc.dr_grpo(max_length=0.5), "max_length must be an integer"),
        (lambda: gc.dr_grpo(max_length=True), "max_length must be an integer"),
        (lambda: gc.grpo(eps_low="0.2"), "eps_low must be a real number, got str"),
        (lambda: gc.PPOClip(eps_high=True), "eps_high must be a real number, got bool"),
        (lambda: gc.SAPOGate(tau_pos=INF), "tau_pos must be a finite number"),
        (lambda: gc.RolloutCorrection(upper=INF), "upper must be a finite number"),
        (lambda: gc.LossNormalizers(NAN, NAN, NAN), "num_tokens must be a finite number"),
        (lambda: gc.LossNormalizers(10.0, 2.0, INF), "max_length must be a finite number"),
        (lambda: gc.LossNormalizers(2.0, 3.0, 5.0), "num_sequences (3.0) exceeds num_tokens"),
        (lambda: gc.LossNormalizers(10.0, 2.0, 5.0, 1.5), "num_replicas must be an integer"),
    ],
)
def test_bad_hyper_parameters_are_refused_at_construction(build, fragment: str) -> None:
    with pytest.raises(ValueError, match=__import__("re").escape(fragment)):
        build()


def test_integral_float_max_length_is_accepted() -> None:
    assert gc.dr_grpo(max_length=8.0).loss.objective.max_length == 8


def test_dr_grpo_max_length_shorter_than_a_response_is_an_error() -> None:
    """Before: dr_grpo(max_length=2) with responses of length 5 was accepted."""
    with pytest.raises(ValueError, match="longer than max_length = 2"):
        gc.dr_grpo(max_length=2).loss(_td())
    assert torch.isfinite(gc.dr_grpo(max_length=5).loss(_td())["loss"])


def test_normalizers_smaller_than_the_batch_are_an_error() -> None:
    td = _td()
    with pytest.raises(ValueError, match="normalizers count fewer tokens or sequences"):
        gc.grpo().loss(td, normalizers=gc.LossNormalizers(3.0, 2.0, 5.0))
    # L_norm in the step's normalisers is a constant of the caller's choosing (verl's
    # loss_scale_factor may be below the longest response): only the counts are checked
    assert torch.isfinite(gc.dr_grpo().loss(td, normalizers=gc.LossNormalizers(100.0, 10.0, 3.0))["loss"])
    norm = gc.step_normalizers([td["response_mask"], td["response_mask"]])
    out = gc.grpo().loss(td, normalizers=norm)
    assert torch.isfinite(out["loss"])


def test_free_step_normalizers_must_match_the_recipes_max_length() -> None:
    """Before: gc.step_normalizers(...) with dr_grpo(max_length=8) silently used the padded width."""
    recipe = gc.dr_grpo(max_length=8)
    td = _td()
    with pytest.raises(ValueError, match=r"normalizers.max_length = 5.0 but this objective's max_length = 8"):
        recipe.loss(td, normalizers=gc.step_normalizers(td["response_mask"]))
    a = recipe.loss(td, normalizers=recipe.step_normalizers(td["response_mask"]))["loss"]
    b = recipe.loss(td, normalizers=gc.step_normalizers(td["response_mask"], max_length=8))["loss"]
    assert torch.equal(a, b)
    assert math.isclose(a.item(), recipe.loss(td)["loss"].item(), rel_tol=1e-6)


# -- devices -------------------------------------------------------------------------------------


def test_meta_tensors_trace_shapes_with_validation_on() -> None:
    """Before: NotImplementedError / "Tensor on device meta is not on the expected device cpu!"."""
    td = _td(device="meta")
    for name in ("grpo", "gspo", "cispo"):
        out = getattr(gc, name)(kl_coef=0.1).loss(td)
        assert out["loss"].device.type == "meta" and out["loss"].shape == ()


def test_mixed_devices_name_the_key() -> None:
    td = _td()
    td["log_probs"] = td["log_probs"].to("meta")
    with pytest.raises(
        ValueError, match=r"'log_probs' must be on the device of 'response_mask' \(cpu\), got meta"
    ):
        gc.grpo().loss(td)
