"""`llm-jax align`: a reward model, DPO or PPO from a trained (or converted) run directory.

    llm-jax align --checkpoint RUN --objective reward --data pairs.jsonl --out RM_RUN [key=value ...]
    llm-jax align --checkpoint RUN --objective dpo    --data pairs.jsonl --out POLICY_RUN beta=0.1
    llm-jax align --checkpoint RUN --objective ppo    --data prompts.jsonl --out POLICY_RUN \\
                  (--reward-model RM_RUN | --reward-fn my_rewards.py:score)

`key=value` overrides set fields of the objective's config (`llm_jax.finetune.
align_config`: RewardConfig, DPOConfig, PPOConfig), e.g. `steps=200 optim.lr=1e-6`;
`model.peft.*` ones tune a plain run through a PEFT method instead of in full, e.g.
`model.peft.method=lora model.peft.lora_rank=16` (a PEFT run is tuned with its own).
A `--reward-fn` is `module:function` or `path/to/file.py:function`, called as
`function(prompt: str, response: str) -> float` on decoded text.
"""

from __future__ import annotations

import dataclasses
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


def _split_overrides(assignments):
    """(model.peft.* assignments, the objective's); other model.* keys are refused."""
    model = [a for a in assignments if a.startswith("model.")]
    bad = [a for a in model if not a.startswith("model.peft.")]
    if bad:
        raise ConfigError(f"{bad[0]}: alignment keeps the model's architecture; only model.peft.* may be set "
                          f"(to tune through LoRA, QLoRA, adapters, prefixes or soft prompts)")
    return model, [a for a in assignments if not a.startswith("model.")]


def _with_peft(base_cfg, params, assignments, checkpoint, seed: int):
    """The base config and parameters with the PEFT method of `model.peft.*` attached."""
    if not assignments:
        return base_cfg, params
    if base_cfg.model.peft.method != "none":
        raise ConfigError(f"model.peft: {checkpoint} is a model.peft.method={base_cfg.model.peft.method!r} run, "
                          f"tuned further with its own method; drop the model.peft.* settings")
    cfg = override(base_cfg, assignments)
    if cfg.model.peft.method == "none":
        return base_cfg, params
    import jax

    from llm_jax.finetune import peft

    tuned, frozen = peft.attach(params, cfg.model, jax.random.key(seed))
    # The tuned run's frozen weights are the starting run's: it becomes the base.
    base_dir = str(pathlib.Path(checkpoint).absolute())
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=base_dir))
    return cfg, peft.combine(tuned, frozen)


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

    peft_overrides, overrides = _split_overrides(args.overrides)
    cfg = override_together(OBJECTIVES[args.objective](), overrides)  # validated before anything loads
    if args.objective != "ppo" and (args.reward_model or args.reward_fn):
        raise ValueError(f"--reward-model / --reward-fn apply to --objective ppo only, not {args.objective}")
    check_new_run_dir(args.out)
    base_cfg, params, base_step = load_trained_model(args.checkpoint)
    tokenizer = load_tokenizer(pathlib.Path(args.checkpoint) / "tokenizer")
    base_cfg, params = _with_peft(base_cfg, params, peft_overrides, args.checkpoint, cfg.seed)
    model_cfg = base_cfg.model
    method = model_cfg.peft.method
    print_fn(f"{args.objective}: starting from {args.checkpoint} (step {base_step})" +
             (f", tuning through {method}" if method != "none" else ""))
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
