"""Alignment: reward model, DPO, PPO and distillation on tiny models and synthetic tasks.

Token ids in the synthetic tasks: 0 pad, 1 eos (as the character tokenizer has them),
2.. ordinary tokens. Each expensive run is a module-scoped fixture shared by its tests,
and the CLI test trains with the same settings (`*_SETTINGS`) on the same model, so it
reuses their compiled steps instead of compiling its own.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import cli
from llm_jax.config import ConfigError, ModelConfig, OptimConfig, PeftConfig
from llm_jax.finetune.align_cli import override_together
from llm_jax.finetune.align_config import DistillConfig, DPOConfig, PPOConfig, RewardConfig
from llm_jax.finetune.distill import distill_train_step, distillation_loss
from llm_jax.finetune.dpo import dpo_loss, train_dpo
from llm_jax.finetune.ppo import generalized_advantages, train_ppo
from llm_jax.finetune.preference import (
    PreferenceDataError,
    preference_data,
    read_preference_pairs,
    read_prompts,
)
from llm_jax.finetune.reward import bradley_terry_loss, init_reward_model, reward_scores, train_reward_model
from llm_jax.finetune.sequences import new_train_state, pack, response_logprob_sum
from llm_jax.models import init_params
from llm_jax.training.losses import cross_entropy_loss
from llm_jax.training.optimizer import make_optimizer

CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32)
EOS = 1
DPO_SETTINGS = ["steps=16", "batch_size=8", "beta=0.1", "log_every=4", "optim.lr=1e-3"]
REWARD_SETTINGS = ["steps=30", "batch_size=16", "log_every=10", "optim.lr=3e-3"]
LORA_CFG = dataclasses.replace(CFG, peft=PeftConfig(method="lora", lora_rank=4, lora_targets="all"))
LORA = ["model.peft.method=lora", "model.peft.lora_rank=4", "model.peft.lora_targets=all"]
LORA_DPO_SETTINGS = ["steps=16", "batch_size=8", "beta=0.1", "log_every=4", "optim.lr=1e-2"]
PPO_SETTINGS = ["iterations=12", "rollout_batch_size=32", "minibatch_size=16", "ppo_epochs=4", "max_new_tokens=8",
                "kl_coef=0.05", "stop_at_eos=false", "optim.lr=5e-3"]


def _optim(lr):
    return OptimConfig(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0)


@pytest.fixture(scope="module")
def base_params():
    return init_params(CFG, jax.random.key(0))


def _prompts(rng, n):
    return [list(rng.integers(2, CFG.vocab_size, size=int(rng.integers(2, 6)))) for _ in range(n)]


# --------------------------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def dpo_data():
    """Chosen responses repeat token 5, rejected ones token 7, after random prompts."""
    rng = np.random.default_rng(0)
    n = 48
    chosen = [[5] * int(rng.integers(2, 6)) + [EOS] for _ in range(n)]
    rejected = [[7] * int(rng.integers(2, 6)) + [EOS] for _ in range(n)]
    return preference_data(_prompts(rng, n), chosen, rejected, max_len=CFG.max_seq_len)


@pytest.fixture(scope="module")
def dpo_run(base_params, dpo_data):
    cfg = override_together(DPOConfig(), DPO_SETTINGS + ["validation_fraction=0.25"])
    return train_dpo(base_params, CFG, dpo_data, cfg, print_fn=lambda _: None)


def test_dpo_raises_the_chosen_over_rejected_margin_on_held_out_pairs(dpo_run):
    first, last = dpo_run.history[0], dpo_run.history[-1]
    assert last["margin"] > first["margin"] + 0.2 and last["loss"] < first["loss"]
    held = dpo_run.held_out
    assert held["margin"] > 0.3 and held["accuracy"] > 0.95 and held["loss"] < np.log(2) - 0.1


def test_dpo_through_lora_trains_the_lora_factors_only(base_params, dpo_data):
    from llm_jax.finetune import peft

    tuned, frozen = peft.attach(base_params, LORA_CFG, jax.random.key(1))
    cfg = override_together(DPOConfig(), LORA_DPO_SETTINGS + ["validation_fraction=0.25"])
    run = train_dpo(peft.combine(tuned, frozen), LORA_CFG, dpo_data, cfg, print_fn=lambda _: None)
    assert run.held_out["margin"] > 0.1 and run.held_out["accuracy"] > 0.9
    new_tuned, new_frozen = peft.split(run.params, LORA_CFG)
    jax.tree.map(np.testing.assert_array_equal, new_frozen, base_params)  # the base is untouched
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_tuned, tuned)
    assert min(jax.tree.leaves(moved)) > 0, moved


def test_dpo_loss_is_log_2_at_the_reference_and_label_smoothing_mixes_the_flipped_label():
    logp = jnp.array([-3.0, -5.0])
    loss, m = dpo_loss(logp, logp - 1, logp, logp - 1, beta=0.5)  # policy == reference
    assert np.isclose(loss, np.log(2)) and m["margin"] == 0 and m["accuracy"] == 0.5  # ties count half
    h = 2.0  # the policy favours chosen by 2 nats more than the reference does
    smooth, _ = dpo_loss(jnp.array([h]), jnp.array([0.0]), jnp.array([0.0]), jnp.array([0.0]), beta=1.0,
                         label_smoothing=0.1)
    expected = -0.9 * np.log(1 / (1 + np.exp(-h))) - 0.1 * np.log(1 / (1 + np.exp(h)))
    assert np.isclose(smooth, expected, atol=1e-6)


# ------------------------------------------------------------------------ reward model


@pytest.fixture(scope="module")
def reward_run(base_params):
    """Chosen responses hold more 5s than rejected ones; the rest is random filler."""
    rng = np.random.default_rng(1)
    n = 64
    chosen, rejected = [], []
    for _ in range(n):
        good = int(rng.integers(1, 5))
        bad = int(rng.integers(0, good))
        for count, out in ((good, chosen), (bad, rejected)):
            response = [5] * count + list(rng.integers(6, CFG.vocab_size, size=6 - count))
            rng.shuffle(response)
            out.append(response + [EOS])
    data = preference_data(_prompts(rng, n), chosen, rejected, max_len=CFG.max_seq_len)
    cfg = override_together(RewardConfig(), REWARD_SETTINGS + ["validation_fraction=0.25"])
    return train_reward_model(base_params, CFG, data, cfg, print_fn=lambda _: None)


def test_reward_model_ranks_held_out_pairs_above_chance(reward_run):
    assert reward_run.held_out_before["accuracy"] == 0.5  # a zero head: every pair ties
    assert reward_run.held_out["accuracy"] >= 0.8 and reward_run.held_out["margin"] > 0.5
    assert reward_run.history[-1]["loss"] < np.log(2) - 0.2


def test_bradley_terry_loss_and_its_centering_term():
    loss, m = bradley_terry_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
    assert np.isclose(loss, np.log(1 + np.exp(-1.0)) / 2 + np.log(1 + np.exp(1.0)) / 2)
    assert m["accuracy"] == 0.5 and m["margin"] == 0
    centred, _ = bradley_terry_loss(jnp.array([3.0]), jnp.array([3.0]), center_coef=0.5)
    assert np.isclose(centred, np.log(2) + 0.5 * 36)


def test_padding_and_its_width_do_not_change_log_probabilities_or_rewards(base_params):
    prompts, responses = [[3, 4, 5], [6, 7]], [[8, 9, EOS], [10, EOS]]
    narrow, wide = pack(prompts, responses, 8, pad_id=0), pack(prompts, responses, 16, pad_id=9)
    rm = init_reward_model(base_params, CFG)
    rm["head"] = {"kernel": jnp.linspace(-1, 1, CFG.d_model), "bias": jnp.array(0.3)}
    both = jax.jit(lambda s: (response_logprob_sum(base_params, CFG, s), reward_scores(rm, CFG, s)))
    for a, b in zip(both(narrow), both(wide)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


# --------------------------------------------------------------------------------- PPO

TARGET = 5  # about 1 / 16 of the sampled tokens at the start


def _target_fraction(prompts, responses):
    """The programmatic reward: the fraction of response tokens that are TARGET."""
    return [np.mean([t == TARGET for t in r]) for r in responses]


@pytest.fixture(scope="module")
def ppo_run(base_params):
    cfg = override_together(PPOConfig(), PPO_SETTINGS)
    prompts = _prompts(np.random.default_rng(2), 32)
    return train_ppo(base_params, CFG, prompts, _target_fraction, cfg, eos_id=EOS, print_fn=lambda _: None)


def test_ppo_raises_a_programmatic_reward_while_the_kl_to_the_reference_stays_bounded(ppo_run):
    scores = [h["score"] for h in ppo_run.history]
    kls = [h["kl"] for h in ppo_run.history]
    assert np.mean(scores[-3:]) > np.mean(scores[:2]) + 0.15, scores
    assert kls[0] == pytest.approx(0, abs=1e-4)  # the first rollout is sampled from the reference itself
    # Nats per 8-token response. The KL-regularised optimum (pi_ref * exp(r / kl_coef)) for this
    # reward sits near 0.6 nats a token (~5 a response); a policy free of the penalty could
    # reach all-TARGET at 8 ln 16 ~ 22.
    assert 0 < max(kls) < 8.0, kls
    assert all(np.isfinite(h["loss"]) and h["skipped"] == 0 for h in ppo_run.history)


def test_gae_matches_the_recursion_written_out():
    gamma, lam = 0.9, 0.8
    rewards = np.array([[0.0, 0.5, -0.2, 1.0, 0.0]], np.float32)
    values = np.array([[0.0, 0.3, 0.1, -0.4, 0.0]], np.float32)
    mask = np.array([[0, 1, 1, 1, 0]], np.float32)  # a prompt action, three response actions, padding
    adv, ret = generalized_advantages(rewards, values * mask, mask, gamma, lam)
    expected, next_adv, next_value = np.zeros(5), 0.0, 0.0
    for t in (3, 2, 1):
        delta = rewards[0, t] + gamma * next_value - values[0, t]
        next_adv = expected[t] = delta + gamma * lam * next_adv
        next_value = values[0, t]
    np.testing.assert_allclose(adv[0], expected, atol=1e-6)
    np.testing.assert_allclose(ret[0], (expected + values[0]) * mask[0], atol=1e-6)


# ------------------------------------------------------------------------ distillation


def test_distillation_loss_reduces_to_cross_entropy_and_to_zero_kl():
    logits = jax.random.normal(jax.random.key(3), (2, 5, CFG.vocab_size))
    targets = jax.random.randint(jax.random.key(4), (2, 5), 0, CFG.vocab_size)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    @jax.jit
    def losses(logits):
        hard, _ = distillation_loss(logits, logits * 3, targets, mask, temperature=2.0, alpha=0.0)
        _, same = distillation_loss(logits, logits, targets, mask, temperature=2.0, alpha=1.0)
        return hard, cross_entropy_loss(logits, targets, mask)[0], same

    hard, ce, same = losses(logits)
    assert np.isclose(hard, ce, rtol=1e-6)
    assert abs(float(same["kl_sum"])) < 1e-5 and float(same["tokens"]) == 8


def test_distillation_lowers_the_kl_to_the_teacher(base_params):
    # The student's architecture with other weights, scaled up for peaked predictions.
    teacher = jax.tree.map(lambda x: 15 * x, init_params(CFG, jax.random.key(5)))
    cfg = DistillConfig(temperature=1.0, alpha=0.9)
    state = new_train_state(base_params, make_optimizer(_optim(1e-2), 30), seed=0)
    rng = np.random.default_rng(7)
    kls = []
    for _ in range(30):
        tokens = rng.integers(2, CFG.vocab_size, size=(8, 17))
        batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
        state, metrics = distill_train_step(state, teacher, batch, student_cfg=CFG, teacher_cfg=CFG, cfg=cfg)
        kls.append(float(metrics["kl_to_teacher"]))  # of each fresh batch, before its update
    assert np.mean(kls[-5:]) < 0.85 * np.mean(kls[:2]), kls
    assert int(state.skipped) == 0 and np.isfinite(metrics["loss"])


# --------------------------------------------------------------------------- bad input


def _write(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"prompt": "ab", "chosen": "cc", "rejected": "dd"})


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 3: not valid JSON"),
    (json.dumps({"prompt": "ab", "chosen": "cc"}), "line 3: missing field 'rejected'"),
    (json.dumps({"prompt": "ab", "chosen": "", "rejected": "dd"}), "line 3: field 'chosen' is empty"),
    (json.dumps({"prompt": "ab", "chosen": "cc", "rejected": "  "}), "line 3: field 'rejected' is empty"),
    (json.dumps({"prompt": "ab", "chosen": "cc", "rejected": "cc"}), "line 3: 'chosen' and 'rejected' are identical"),
    (json.dumps({"prompt": "ab", "chosen": 3, "rejected": "dd"}), "line 3: field 'chosen' must be a string"),
    (json.dumps(["ab", "cc", "dd"]), "line 3: expected a JSON object"),
])
def test_bad_preference_lines_are_reported_with_their_line_number(tmp_path, line, message):
    path = _write(tmp_path, [GOOD, "", line, GOOD])  # the blank line 2 is skipped, not renumbered
    with pytest.raises(PreferenceDataError, match=message):
        read_preference_pairs(path)


def test_prompts_files_and_encoded_pairs_refuse_what_cannot_train(tmp_path):
    assert read_prompts(_write(tmp_path, [GOOD, json.dumps({"prompt": "x"})])) == ["ab", "x"]
    with pytest.raises(PreferenceDataError, match="line 1: field 'prompt' is empty"):
        read_prompts(_write(tmp_path, [json.dumps({"prompt": ""})]))
    with pytest.raises(PreferenceDataError, match="line 4: the chosen response is empty"):
        preference_data([[2], [3]], [[4], []], [[5], [6]], max_len=8, lines=[2, 4])
    with pytest.raises(PreferenceDataError, match="pair 0: the prompt's 8 tokens leave no room"):
        preference_data([[2] * 8], [[4]], [[5]], max_len=8)
    data = preference_data([[2, 3]], [[4] * 10], [[5]], max_len=8)
    assert data.truncated == 1 and int(data.chosen.lengths[0]) == 8  # cut to fit, and counted
    with pytest.raises(PreferenceDataError, match="pair 0: the chosen and rejected responses are the same within"):
        preference_data([[2, 3]], [[4] * 6 + [5]], [[4] * 6 + [6]], max_len=8)  # they differ past the cut


def test_a_preference_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(PreferenceDataError, match="line 2: not valid UTF-8"):
        read_preference_pairs(path)


def test_ppo_rollouts_never_share_a_key_across_iterations():
    from llm_jax.finetune.ppo import _rollout_seed

    cfg = PPOConfig(iterations=5, rollout_batch_size=4, minibatch_size=2)
    keys = [_rollout_seed(cfg, it) + row for it in range(1, 6) for row in range(4)]  # row b draws with seed + b
    assert len(set(keys)) == len(keys) == 20


@pytest.mark.parametrize("make, field", [
    (lambda: DPOConfig(beta=0), "beta"),
    (lambda: DPOConfig(label_smoothing=0.5), "label_smoothing"),
    (lambda: RewardConfig(validation_fraction=1.0), "validation_fraction"),
    (lambda: PPOConfig(rollout_batch_size=12, minibatch_size=8), "minibatch_size"),
    (lambda: PPOConfig(gae_lambda=1.5), "gae_lambda"),
    (lambda: DistillConfig(alpha=1.5), "alpha"),
])
def test_configs_are_validated_at_construction(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


# --------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, base_params):
    from llm_jax.data.tokenizers import CharTokenizer
    from llm_jax.interop.convert import write_run_dir

    root = tmp_path_factory.mktemp("align_cli")
    tokenizer = CharTokenizer.from_text("abcdefgh")
    run = write_run_dir(root / "base", base_params, CFG, tokenizer, name="tiny")
    pairs = [{"prompt": "ab", "chosen": "ccc", "rejected": "hhh"}, {"prompt": "ba", "chosen": "cc", "rejected": "hg"},
             {"prompt": "abc", "chosen": "cdc", "rejected": "gh"}, {"prompt": "g", "chosen": "ccd", "rejected": "hh"}]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root, run, data


def test_align_cli_writes_runs_that_generate_loads(base_run, base_params, capsys):
    root, run, data = base_run
    common = ["--checkpoint", str(run), "--data", str(data)]
    everything = ["validation_fraction=0"]
    assert cli.main(["align", *common, "--objective", "dpo", "--out", str(root / "dpo"), *DPO_SETTINGS,
                     *everything]) == 0
    assert cli.main(["align", *common, "--objective", "reward", "--out", str(root / "rm"), *REWARD_SETTINGS,
                     *everything]) == 0
    # Settings in another order than the fixture's: each is retried until the others make it valid.
    assert cli.main(["align", *common, "--objective", "ppo", "--out", str(root / "ppo"), "--reward-model",
                     str(root / "rm"), *reversed(PPO_SETTINGS)]) == 0
    rewards = root / "rewards.py"
    rewards.write_text("def score(prompt, response):\n    return response.count('c') / max(len(response), 1)\n")
    assert cli.main(["align", *common, "--objective", "ppo", "--out", str(root / "ppo_fn"), "--reward-fn",
                     f"{rewards}:score", *PPO_SETTINGS]) == 0
    capsys.readouterr()
    scores = [r["ppo/score"] for r in map(json.loads, (root / "ppo_fn" / "metrics.jsonl").read_text().splitlines())]
    assert len(scores) == 12 and all(0 <= s <= 1 for s in scores)
    report = json.loads((root / "dpo" / "alignment.json").read_text())
    assert report["objective"] == "dpo" and report["config"]["beta"] == 0.1 and report["steps"] == 16
    assert json.loads((root / "rm" / "alignment.json").read_text())["summary"]["held_out"] is None
    assert cli.main(["align", *common, "--objective", "dpo", "--out", str(root / "lora"), *LORA_DPO_SETTINGS,
                     *LORA, *everything]) == 0
    from llm_jax.training.checkpoint import load_trained_model

    config, params, _ = load_trained_model(root / "lora")  # the LoRA factors + the base run's weights
    assert config.model == LORA_CFG and config.train.init_from == str(run)
    np.testing.assert_array_equal(params["embed"]["embedding"], base_params["embed"]["embedding"])
    capsys.readouterr()
    for policy, step in (("dpo", 16), ("ppo", 12), ("lora", 16)):
        assert cli.main(["generate", "--checkpoint", str(root / policy), "--prompt", "ab", "max_new_tokens=3",
                         "temperature=0"]) == 0
        assert f"step {step}" in capsys.readouterr().err


def test_align_cli_reports_bad_input_and_exits_2(base_run, tmp_path, capsys):
    root, run, data = base_run
    bad = _write(tmp_path, [GOOD, json.dumps({"prompt": "ab", "chosen": "cc", "rejected": ""})])
    args = ["align", "--checkpoint", str(run), "--objective", "dpo", "--out", str(tmp_path / "o")]
    assert cli.main([*args, "--data", str(bad)]) == 2
    assert "pairs.jsonl, line 2: field 'rejected' is empty" in capsys.readouterr().err
    assert cli.main([*args, "--data", str(data), "bta=0.2"]) == 2
    assert "DPOConfig has no field 'bta'" in capsys.readouterr().err
    ppo = ["align", "--checkpoint", str(run), "--objective", "ppo", "--data", str(data), "--out", str(tmp_path / "p")]
    assert cli.main(ppo) == 2
    assert "exactly one of --reward-model" in capsys.readouterr().err
