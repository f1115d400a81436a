"""`llm-jax align`: a reward model, DPO or PPO from a trained (or converted) run directory.

    llm-jax align --checkpoint RUN --objective reward --data pairs.jsonl --out RM_RUN [key=value ...]
    llm-jax align --checkpoint RUN --objective dpo    --data pairs.jsonl --out POLICY_RUN beta=0.1
    llm-jax align --checkpoint RUN --objective ppo    --data prompts.jsonl --out POLICY_RUN \\
                  (--reward-model RM_RUN | --reward-fn my_rewards.py:score)

`key=value` overrides set fields of the objective's config (`llm_jax.finetune.
align_config`: RewardConfig, DPOConfig, PPOConfig), e.g. `steps=200 optim.lr=1e-6`.
A `--reward-fn` is `module:function` or `path/to/file.py:function`, called as
`function(prompt: str, response: str) -> float` on decoded text.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
from typing import Callable

from llm_jax.config import ConfigError, override
from llm_jax.finetune.align_config import DPOConfig, PPOConfig, RewardConfig

OBJECTIVES = {"reward": RewardConfig, "dpo": DPOConfig, "ppo": PPOConfig}


def load_text_reward(spec: str) -> Callable[[str, str], float]:
    """`module:function` or `file.py:function` -> the function."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--reward-fn {spec!r} must look like module:function or path/to/file.py:function")
    if where.endswith(".py"):
        path = pathlib.Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"--reward-fn: no such file {path}")
        spec_obj = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec_obj)
        spec_obj.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn: {where} has no function {name!r}")
    return fn


def _text_reward_fn(fn: Callable[[str, str], float], tokenizer):
    """A token-level `RewardFn` calling fn(prompt_text, response_text) row by row (eos dropped)."""

    def reward(prompts, responses):
        strip = lambda r: r[:-1] if r and r[-1] == tokenizer.eos_id else r  # noqa: E731
        return [float(fn(tokenizer.decode(p), tokenizer.decode(strip(r)))) for p, r in zip(prompts, responses)]

    return reward


def override_together(config, assignments):
    """`llm_jax.config.override` with the assignments in any order.

    Each assignment builds (and validates) a config, so one that only makes sense with a
    later one (rollout_batch_size=4 before minibatch_size=2) is retried after the others;
    the first error is raised if a pass makes no progress.
    """
    pending = list(assignments)
    while pending:
        failed = []
        for assignment in pending:
            try:
                config = override(config, [assignment])
            except ConfigError as e:
                failed.append((assignment, e))
        if len(failed) == len(pending):
            raise failed[0][1]
        pending = [assignment for assignment, _ in failed]
    return config


def _max_len(cfg, model_cfg) -> int:
    max_len = cfg.max_len or model_cfg.max_seq_len
    if max_len > model_cfg.max_seq_len:
        raise ConfigError(f"max_len: {max_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    return max_len


def _ppo_reward(args, tokenizer, model_cfg):
    from llm_jax.finetune.ppo import reward_model_fn
    from llm_jax.finetune.runs import load_reward_model

    if (args.reward_model is None) == (args.reward_fn is None):
        raise ValueError("--objective ppo needs exactly one of --reward-model RUN_DIR or --reward-fn MODULE:FUNCTION")
    if args.reward_fn is not None:
        return _text_reward_fn(load_text_reward(args.reward_fn), tokenizer)
    rm_config, rm_params = load_reward_model(args.reward_model)
    if rm_config.model.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"the reward model's vocabulary ({rm_config.model.vocab_size}) differs from the policy's "
                         f"({model_cfg.vocab_size}); they must share a tokenizer")
    return reward_model_fn(rm_params, rm_config.model, tokenizer.pad_id)


def main_align(args, print_fn=print) -> int:
    from llm_jax.data.tokenizers import load_tokenizer
    from llm_jax.finetune import preference
    from llm_jax.finetune.runs import check_new_run_dir, save_aligned_run
    from llm_jax.training.checkpoint import load_trained_model

    cfg = override_together(OBJECTIVES[args.objective](), args.overrides)  # validated before anything loads
    if args.objective != "ppo" and (args.reward_model or args.reward_fn):
        raise ValueError(f"--reward-model / --reward-fn apply to --objective ppo only, not {args.objective}")
    check_new_run_dir(args.out)
    base_cfg, params, base_step = load_trained_model(args.checkpoint)
    tokenizer = load_tokenizer(pathlib.Path(args.checkpoint) / "tokenizer")
    model_cfg = base_cfg.model
    print_fn(f"{args.objective}: starting from {args.checkpoint} (step {base_step})")
    save = dict(objective=args.objective, objective_config=cfg, base_run_dir=args.checkpoint)

    if args.objective in ("reward", "dpo"):
        pairs = preference.read_preference_pairs(args.data)
        data = preference.encode_pairs(pairs, tokenizer, _max_len(cfg, model_cfg))
        print_fn(f"{len(pairs)} preference pairs from {args.data}" +
                 (f"; {data.truncated} with a response cut to max_len" if data.truncated else ""))
    if args.objective == "reward":
        from llm_jax.finetune.reward import train_reward_model

        result = train_reward_model(params, model_cfg, data, cfg, print_fn=print_fn)
        out = save_aligned_run(args.out, base_cfg, result.params["lm"], step=cfg.steps,
                               heads={"reward_head": result.params["head"]}, history=result.history,
                               summary={"held_out": result.held_out, "held_out_before": result.held_out_before},
                               **save)
    elif args.objective == "dpo":
        from llm_jax.finetune.dpo import train_dpo

        result = train_dpo(params, model_cfg, data, cfg, print_fn=print_fn)
        out = save_aligned_run(args.out, base_cfg, result.params, step=cfg.steps, history=result.history,
                               summary={"train": result.train, "held_out": result.held_out}, **save)
    else:
        from llm_jax.finetune.ppo import train_ppo

        reward_fn = _ppo_reward(args, tokenizer, model_cfg)
        prompts = [tokenizer.encode(p) for p in preference.read_prompts(args.data)]
        result = train_ppo(params, model_cfg, prompts, reward_fn, cfg, eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id, print_fn=print_fn)
        if result.truncated_prompts:
            print_fn(f"{result.truncated_prompts} prompts were cut from the left to leave room for the response")
        out = save_aligned_run(args.out, base_cfg, result.params, step=cfg.iterations,
                               heads={"value_head": result.value_head}, history=result.history,
                               summary={"last": result.history[-1] if result.history else None}, **save)
    print_fn(f"wrote {out} (try: llm-jax generate --checkpoint {out} --prompt ...)")
    return 0
