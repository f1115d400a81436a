"""Run directories of aligned models: what `llm-jax generate --checkpoint` (and PPO) read.

    OUT/checkpoints/<step>/   orbax: state {step, params[, reward_head | value_head]} + config
    OUT/tokenizer/            copied from the base run
    OUT/metrics.jsonl         the objective's logged metrics, `<objective>/<name>`
    OUT/alignment.json        objective, its config, the base run, final metrics

`params` is the LM, exactly as a training run stores it, so every reader of run
directories (`load_trained_model`, `generate`, `evaluate`, `convert --to-hf`) takes an
aligned policy as it is; a reward model's head sits beside it as `reward_head`. The
checkpoint holds no optimizer state: it serves inference and PPO, not a resumed run.

A PEFT model (`model.peft`) is stored as a PEFT run is: its tuned parameters only, with
`train.init_from` naming the plain run that holds the rest (the base config's own).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from llm_jax.config import ExperimentConfig, to_dict
from llm_jax.training.checkpoint import load_trained_model, save_model_checkpoint
from llm_jax.training.metrics import MetricsWriter


def check_new_run_dir(out_dir) -> pathlib.Path:
    """`out_dir` made absolute, if it holds no checkpoints yet (checked before training starts)."""
    out_dir = pathlib.Path(out_dir).absolute()
    checkpoints = out_dir / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise ValueError(f"{checkpoints} already holds checkpoints; write the aligned model to a new directory")
    return out_dir


def save_aligned_run(out_dir, base_config: ExperimentConfig, params, *, step: int, objective: str,
                     objective_config, base_run_dir=None, heads: dict | None = None,
                     history: list[dict] = (), summary: dict | None = None) -> pathlib.Path:
    """Write an aligned model (LM `params`, optional named `heads`) as a run directory."""
    out_dir = check_new_run_dir(out_dir)
    peft = base_config.model.peft.method != "none"
    if peft:
        from llm_jax.finetune.sequences import split_tuned

        params = split_tuned(params, base_config.model)[0]
    # A plain model needs no base; a PEFT one keeps the base its frozen weights come from.
    init_from = base_config.train.init_from if peft else None
    train = dataclasses.replace(base_config.train, run_dir=str(out_dir), init_from=init_from)
    config = dataclasses.replace(base_config, name=f"{base_config.name}-{objective}", train=train)
    save_model_checkpoint(out_dir, config, params, step=step, extra=heads)
    if base_run_dir is not None and (pathlib.Path(base_run_dir) / "tokenizer").is_dir():
        shutil.copytree(pathlib.Path(base_run_dir) / "tokenizer", out_dir / "tokenizer", dirs_exist_ok=True)
    writer = MetricsWriter(out_dir, tensorboard=False)
    try:
        for record in history:
            record = dict(record)
            at = int(record.pop("step", record.pop("iteration", 0)))
            writer.write(at, {f"{objective}/{k}": v for k, v in record.items()})
    finally:
        writer.close()
    report = {"objective": objective, "config": to_dict(objective_config),
              "base_run_dir": None if base_run_dir is None else str(pathlib.Path(base_run_dir).absolute()),
              "steps": step, "summary": summary or {}}
    (out_dir / "alignment.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_reward_model(run_dir):
    """(ExperimentConfig, {"lm": ..., "head": ...}) of a run written by `--objective reward`."""
    config, lm_params, step = load_trained_model(run_dir)
    abstract = {"kernel": jax.ShapeDtypeStruct((config.model.d_model,), "float32"),
                "bias": jax.ShapeDtypeStruct((), "float32")}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "checkpoints") as manager:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"reward_head": abstract},
                restore_args={"reward_head": jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=device), abstract)},
                partial_restore=True,
            )))
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise ValueError(f"{run_dir} holds no reward_head: it is not a reward model "
                             f"(train one with `llm-jax align --objective reward`); {type(e).__name__}: {e}") from None
    return config, {"lm": lm_params, "head": restored["state"]["reward_head"]}
