"""RecipeGRPOTrainer: a real TRL GRPOTrainer on a tiny Qwen3, on the CPU, without vLLM.

- Training: a few optimizer steps with gradient accumulation and ``steps_per_generation >
  gradient_accumulation_steps`` (so the second step is off-policy). Before each optimizer step,
  the accumulated gradient must equal the recipe's gradient on the whole accumulation window,
  recomputed here from a plain forward pass.
- Parity: on the same generated batch, the recipe's loss equals TRL's own ``_compute_loss`` for
  the pairs that share an objective, and differs where the documentation says it differs.
"""

from __future__ import annotations

import re

import pytest
import torch
from datasets import Dataset
from tensordict import TensorDict
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import gspo_components as gc
from gspo_components.integrations.trl import RecipeGRPOTrainer, trl_batch_to_tensordict

G = 4
MAX_NEW = 8
PROMPTS = ["12+3=", "4+5=", "7+8=", "9+9=", "3+3=", "6+1="]


def digit_reward(completions, **kwargs):
    """Number of digits in the completion."""
    return [float(sum(ch.isdigit() for ch in text)) for text in completions]


def _config(tmp_path, **overrides) -> GRPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=G,
        num_generations=G,
        max_completion_length=MAX_NEW,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: the accumulated gradient is compared as it is
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        seed=0,
        shuffle_dataset=False,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def _dataset() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS})


def _trainer(cls, model, tok, args, **kwargs):
    return cls(
        model=model,
        reward_funcs=digit_reward,
        args=args,
        train_dataset=_dataset(),
        processing_class=tok,
        **kwargs,
    )


def _plain_log_probs(model, batch) -> torch.Tensor:
    """Per-token log-probs of the completions from a plain forward pass (no TRL code)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    t = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits.float()
    return (
        torch.log_softmax(logits[:, -t - 1 : -1], -1)
        .gather(-1, batch["completion_ids"][..., None])
        .squeeze(-1)
    )


def _reference_loss(recipe: gc.Recipe, model, batch) -> torch.Tensor:
    log_probs = _plain_log_probs(model, batch)
    old = batch.get("old_per_token_logps")
    td = TensorDict(
        {
            "log_probs": log_probs,
            "old_log_probs": log_probs.detach() if old is None else old,
            "advantages": batch["advantages"],
            "response_mask": batch["completion_mask"].bool(),
        },
        batch_size=[log_probs.shape[0]],
    )
    return recipe.loss(td)[recipe.loss.out_key("loss")]


def _params(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _grads(loss, model) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, _params(model), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(_params(model), grads, strict=True)]


def _assert_close(a, b, rtol, atol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


class WindowGradientCheck(TrainerCallback):
    """Before each optimizer step: accumulated gradient vs the recipe on the whole window."""

    def __init__(self, recipe: gc.Recipe | None = None) -> None:
        self.trainer: GRPOTrainer | None = None
        self.recipe = recipe  # default: the trainer's
        self.windows: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        tr = self.trainer
        ga, spg = args.gradient_accumulation_steps, args.steps_per_generation
        start = tr._step - ga
        window = [tr._buffered_inputs[(start + k) % spg] for k in range(ga)]
        keys = ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages"]
        if window[0].get("old_per_token_logps") is not None:
            keys.append("old_per_token_logps")
        batch = {k: torch.cat([w[k] for w in window]) for k in keys}
        recipe = self.recipe or tr.recipe
        expected = _grads(_reference_loss(recipe, tr.model, batch), tr.model)
        actual = [p.grad.detach().clone() for p in _params(tr.model)]
        self.windows.append({"batch": batch, "expected": expected, "actual": actual})


SPG4 = {"steps_per_generation": 4}  # two optimizer steps per generation batch
REUSE = {"steps_per_generation": 2, "num_iterations": 2}  # each generation batch used twice


@pytest.mark.parametrize(
    ("name", "recipe", "token_advantages", "layout"),
    [
        ("dapo", gc.dapo(), None, SPG4),
        # GSPO-token with real per-token advantages (TRL removed this level): each token of a
        # completion gets the sequence advantage scaled by a token-dependent factor
        (
            "gspo_token",
            gc.gspo_token(eps_low=0.02, eps_high=0.02),
            lambda b: b["advantages"][:, None] * (1.0 + 0.5 * (b["completion_ids"] % 3 == 0).float()),
            SPG4,
        ),
        ("dr_grpo-num_iterations=2", gc.dr_grpo(), None, REUSE),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_training_steps_are_exact_over_the_accumulation_window(
    tmp_path, tiny_tokenizer, make_tiny_model, name, recipe, token_advantages, layout
):
    check = WindowGradientCheck()
    args = _config(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=2e-4,
        **layout,
    )
    tr = _trainer(
        RecipeGRPOTrainer,
        make_tiny_model(0),
        tiny_tokenizer,
        args,
        recipe=recipe,
        token_advantages=token_advantages,
        callbacks=[check],
    )
    check.trainer = tr
    tr.train()
    assert len(check.windows) == 2
    for window in check.windows:
        lengths = window["batch"]["completion_mask"].sum(-1)
        assert lengths.unique().numel() >= 2  # uneven lengths: the normalisers matter
        assert any(g.abs().sum() > 0 for g in window["actual"])
        _assert_close(window["actual"], window["expected"], rtol=1e-5, atol=1e-6)
    # the second window is off-policy (TRL kept π_old from before the first update)
    assert "old_per_token_logps" in check.windows[1]["batch"]
    if token_advantages is not None:
        adv = check.windows[0]["batch"]["advantages"]
        assert adv.dim() == 2 and not torch.allclose(adv, adv[:, :1].expand_as(adv))
    logged = [h for h in tr.state.log_history if "recipe/clip_fraction" in h]
    assert len(logged) == 2


def test_trl_own_dapo_normaliser_is_not_exact_per_window(tmp_path, tiny_tokenizer, make_tiny_model):
    """Documented difference: with steps_per_generation > gradient_accumulation_steps, TRL's
    ``dapo`` divides every window by the generation batch's average token count per window."""
    check = WindowGradientCheck(recipe=gc.dapo())
    args = _config(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        max_steps=2,
        learning_rate=2e-4,
        loss_type="dapo",
        epsilon_high=0.28,
    )
    tr = _trainer(GRPOTrainer, make_tiny_model(0), tiny_tokenizer, args, callbacks=[check])
    check.trainer = tr
    tr.train()
    tokens = [float(w["batch"]["completion_mask"].sum()) for w in check.windows]
    assert tokens[0] != tokens[1]  # windows of different token counts
    for window in check.windows:
        assert not all(
            torch.allclose(a, b, rtol=1e-5, atol=1e-6)
            for a, b in zip(window["actual"], window["expected"], strict=True)
        )


@pytest.fixture(scope="module")
def same_batch(tiny_tokenizer, make_tiny_model, tmp_path_factory):
    """One generated batch (3 prompts × G) with an off-policy π_old and a reference policy."""
    tmp = tmp_path_factory.mktemp("batch")
    model = make_tiny_model(0)
    tr = _trainer(RecipeGRPOTrainer, model, tiny_tokenizer, _config(tmp), recipe=gc.grpo())
    rows = [{"prompt": p} for p in PROMPTS[:3] for _ in range(G)]
    torch.manual_seed(7)
    batch = tr._generate_and_score_completions(rows)
    with torch.no_grad():
        logps = _plain_log_probs(model, batch)
    gen = torch.Generator().manual_seed(0)
    n, t = logps.shape
    scale = torch.tensor([2e-4, 0.3]).repeat(n // 2).unsqueeze(-1)  # some GSPO rows in band, some clipped
    batch["old_per_token_logps"] = logps + scale * torch.randn(n, t, generator=gen)
    batch["ref_per_token_logps"] = logps + 0.1 * torch.randn(n, t, generator=gen)
    lengths = batch["completion_mask"].sum(-1)
    assert lengths.min() >= 1 and lengths.unique().numel() >= 2
    assert batch["advantages"].abs().sum() > 0
    return batch


def _loss_and_grads(cls, tmp_path, tok, make_model, batch, config_kwargs, **kwargs):
    model = make_model(0)  # every trainer gets identical weights
    tr = _trainer(cls, model, tok, _config(tmp_path, **config_kwargs), **kwargs)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # set by Trainer's loop; a direct call is a one-batch step
    loss = tr._compute_loss(tr.model, batch)
    return loss.detach(), _grads(loss, tr.model), tr._metrics["train"]


GSPO_EPS = {"epsilon": 3e-4, "epsilon_high": 4e-4}
PARITY = {
    # name: (TRL GRPOConfig loss settings, recipe, same value?, same gradient?)
    "gspo=trl(sequence,grpo)": (
        {"importance_sampling_level": "sequence", "loss_type": "grpo", **GSPO_EPS},
        gc.gspo(),
        True,
        True,
    ),
    "grpo=trl(token,grpo)": (
        {"importance_sampling_level": "token", "loss_type": "grpo"},
        gc.grpo(),
        True,
        True,
    ),
    "dapo=trl(token,dapo)": (
        {"importance_sampling_level": "token", "loss_type": "dapo", "epsilon_high": 0.28},
        gc.dapo(),
        True,
        True,
    ),
    "dr_grpo=trl(token,dr_grpo)": (
        {"importance_sampling_level": "token", "loss_type": "dr_grpo"},
        gc.dr_grpo(max_length=MAX_NEW),
        True,
        True,
    ),
    # TRL's default loss_type="dapo" length-weights GSPO's sequences: it is GSPO with token-mean
    "gspo-token-mean=trl(sequence,dapo)": (
        {"importance_sampling_level": "sequence", "loss_type": "dapo", **GSPO_EPS},
        gc.gspo(aggregation="token-mean"),
        True,
        True,
    ),
    "gspo!=trl(sequence,dapo)": (
        {"importance_sampling_level": "sequence", "loss_type": "dapo", **GSPO_EPS},
        gc.gspo(),
        False,
        False,
    ),
    # CISPO: TRL's epsilon_high is the cap itself (1 + ε); its loss value is −ŵ·Â·ℓ, ours −ŵ·Â
    "cispo~trl(token,cispo)": (
        {"importance_sampling_level": "token", "loss_type": "cispo", "epsilon_high": 1.28},
        gc.cispo(eps_high=0.28),
        False,
        True,
    ),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_with_trl_loss_on_the_same_batch(tmp_path, tiny_tokenizer, make_tiny_model, same_batch, name):
    trl_settings, recipe, same_value, same_grad = PARITY[name]
    theirs = _loss_and_grads(GRPOTrainer, tmp_path, tiny_tokenizer, make_tiny_model, same_batch, trl_settings)
    ours = _loss_and_grads(
        RecipeGRPOTrainer, tmp_path, tiny_tokenizer, make_tiny_model, same_batch, {}, recipe=recipe
    )
    value_close = torch.allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-7)
    grad_close = all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ours[1], theirs[1], strict=True)
    )
    assert value_close == same_value, (float(ours[0]), float(theirs[0]))
    assert grad_close == same_grad
    if same_value:
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-8)
    if same_grad:
        _assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)
    if name.startswith("gspo="):  # the batch exercises both sides of GSPO's band
        assert 0 < ours[2]["recipe/seq_clip_fraction"][-1] < 1


def test_kl_term_matches_trl(tmp_path, tiny_tokenizer, make_tiny_model, same_batch):
    """β·k3 inside the same aggregation (TRL's bias correction off). TRL loads the reference
    model from a path when β > 0, so the tiny model is saved first."""
    path = tmp_path / "tiny"
    make_tiny_model(0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    settings = {"beta": 0.05, "use_bias_correction_kl": False}
    trl_only = {"loss_type": "grpo"}  # the recipe decides the loss; setting it for ours would warn
    results = []
    for cls, kwargs in ((GRPOTrainer, {}), (RecipeGRPOTrainer, {"recipe": gc.grpo(kl_coef=0.05)})):
        tr = cls(
            model=str(path),
            reward_funcs=digit_reward,
            args=_config(tmp_path / cls.__name__, **settings, **(trl_only if cls is GRPOTrainer else {})),
            train_dataset=_dataset(),
            processing_class=tiny_tokenizer,
            **kwargs,
        )
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
        loss = tr._compute_loss(tr.model, same_batch)
        results.append((loss.detach(), _grads(loss, tr.model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-8)
    _assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_gspo_token_with_sequence_advantages_equals_trl_gspo(
    tmp_path, tiny_tokenizer, make_tiny_model, same_batch
):
    batch = dict(same_batch)
    batch["advantages"] = same_batch["advantages"][:, None].expand_as(same_batch["completion_mask"]).float()
    ours = _loss_and_grads(
        RecipeGRPOTrainer, tmp_path, tiny_tokenizer, make_tiny_model, batch, {}, recipe=gc.gspo_token()
    )
    trl_settings = {"importance_sampling_level": "sequence", "loss_type": "grpo", **GSPO_EPS}
    theirs = _loss_and_grads(GRPOTrainer, tmp_path, tiny_tokenizer, make_tiny_model, same_batch, trl_settings)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-8)
    _assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("keys", ["canonical", "renamed"])
def test_recipe_advantages(tmp_path, tiny_tokenizer, make_tiny_model, keys):
    """With ``advantages="recipe"`` the trainer feeds the recipe's own estimator, under the keys
    that estimator reads (renamed ones included)."""
    seen: list[float] = []
    renamed = {"rewards": "score", "group_ids": ("meta", "prompt"), "reward_valid": "scored"}
    estimator = gc.GroupMeanAdvantage(in_keys=renamed if keys == "renamed" else None)

    def reward(completions, **kwargs):
        out = [float(sum(ch.isdigit() for ch in text)) for text in completions]
        out[:G] = [1.0] * G  # the first group is constant
        seen.extend(out)
        return out

    tr = RecipeGRPOTrainer(
        model=make_tiny_model(0),
        reward_funcs=reward,
        args=_config(tmp_path),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer,
        recipe=gc.dr_grpo(advantage=estimator),
        advantages="recipe",
    )
    batch = tr._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:3] for _ in range(G)])
    rewards = torch.tensor(seen).view(-1, G)
    expected = (rewards - rewards.mean(-1, keepdim=True)).view(-1)
    torch.testing.assert_close(batch["advantages"], expected)
    assert torch.equal(batch["advantages"][:G], torch.zeros(G))


# TRL's batch holds these entries (ref_log_probs with beta > 0 and rollout_log_probs with vLLM: neither here)
TRL_ENTRIES = {"log_probs", "old_log_probs", "advantages", "response_mask", "entropy"}


@pytest.mark.parametrize("name", list(gc.RECIPES))
def test_every_stock_recipe_runs(tmp_path, tiny_tokenizer, make_tiny_model, same_batch, name):
    """Every stock recipe (gspo_components.RECIPES) in TRL's _compute_loss on the same off-policy
    batch: the loss and gradients of recipe.loss on log-probs (and entropies) from a plain forward
    pass. A recipe reading an entry TRL's batch does not hold is refused at construction, naming it."""
    recipe = gc.RECIPES[name]()
    needed = set(recipe.loss.required_keys)
    if not needed <= TRL_ENTRIES:
        with pytest.raises(ValueError, match=re.escape(f"reads {sorted(needed - TRL_ENTRIES)}")):
            _trainer(RecipeGRPOTrainer, make_tiny_model(0), tiny_tokenizer, _config(tmp_path), recipe=recipe)
        return
    ours = _loss_and_grads(
        RecipeGRPOTrainer, tmp_path, tiny_tokenizer, make_tiny_model, same_batch, {}, recipe=recipe
    )
    model = make_tiny_model(0)
    ids = torch.cat([same_batch["prompt_ids"], same_batch["completion_ids"]], 1)
    attention = torch.cat([same_batch["prompt_mask"], same_batch["completion_mask"]], 1)
    t = same_batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits.float()[:, -t - 1 : -1]
    log_softmax = torch.log_softmax(logits, -1)
    td = TensorDict(
        {
            "log_probs": log_softmax.gather(-1, same_batch["completion_ids"][..., None]).squeeze(-1),
            "old_log_probs": same_batch["old_per_token_logps"],
            "advantages": same_batch["advantages"],
            "response_mask": same_batch["completion_mask"].bool(),
            "entropy": -(log_softmax.exp() * log_softmax).sum(-1).detach(),
        },
        batch_size=[ids.shape[0]],
    )
    ref = recipe.loss(td)[recipe.loss.out_key("loss")]
    expected = _grads(ref, model)
    assert any(g.abs().sum() > 0 for g in expected)
    torch.testing.assert_close(ours[0], ref.detach(), rtol=1e-5, atol=1e-6)
    _assert_close(ours[1], expected, rtol=1e-4, atol=1e-6)


def test_batch_mapping():
    b, t = 3, 5
    lp = torch.randn(b, t, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    batch = {
        "completion_mask": mask,
        "tool_mask": torch.tensor([[1, 0, 1, 1, 1]] * b),
        "advantages": torch.tensor([1.0, -1.0, 0.5]),
        "sampling_per_token_logps": torch.zeros(b, t),
        "importance_sampling_ratio": torch.tensor([[0.5], [1.0], [2.0]]),
    }
    td = trl_batch_to_tensordict(batch, lp)
    assert torch.equal(td["response_mask"], (mask * batch["tool_mask"]).bool())
    assert torch.equal(td["old_log_probs"], lp.detach()) and not td["old_log_probs"].requires_grad
    assert td["is_weights"].shape == (b, t) and torch.equal(td["is_weights"][2], torch.full((t,), 2.0))
    assert torch.equal(td["rollout_log_probs"], torch.zeros(b, t))
    with pytest.raises(ValueError, match="completion_mask"):
        trl_batch_to_tensordict(batch, lp[:, :4])


def test_configurations_without_exact_normalisers_are_refused(tmp_path, tiny_tokenizer, make_tiny_model):
    def build(recipe=None, **overrides):
        return _trainer(
            RecipeGRPOTrainer,
            make_tiny_model(0),
            tiny_tokenizer,
            _config(tmp_path, **overrides),
            recipe=recipe or gc.gspo(),
        )

    with pytest.raises(ValueError, match="multiple of gradient_accumulation_steps"):
        build(gradient_accumulation_steps=2, steps_per_generation=3)
    with pytest.raises(ValueError, match="beta"):
        build(recipe=gc.grpo(kl_coef=0.1))
    with pytest.raises(ValueError, match=r"delta=4\.0 change TRL's loss"):
        build(delta=4.0)
    tr = _trainer(
        RecipeGRPOTrainer,
        make_tiny_model(0),
        tiny_tokenizer,
        _config(tmp_path),
        recipe=gc.gspo_token(),
        token_advantages=lambda b: b["advantages"],  # [B], not [B, T]
    )
    with pytest.raises(ValueError, match="token_advantages"):
        tr._generate_and_score_completions([{"prompt": PROMPTS[0]}] * G)
