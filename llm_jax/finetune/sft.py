"""Supervised fine-tuning (`llm-jax finetune`): a trained run + JSONL conversations -> a tuned run.

    base run (llm_jax run or `llm-jax convert`ed HF checkpoint)
        -> model config, tokenizer, weights (frozen, or all tuned for model.peft.method=none)
    sft.train_path -> chat template -> packed response-masked batches
        -> finetune.step (tuned parameters only) -> orbax checkpoints in train.run_dir

The tuned run's checkpoints hold its state (the tuned parameters and their optimizer
state, the data iterator) and its config, whose `train.init_from` names the base run;
`load_trained_model` composes the two, so `llm-jax generate --checkpoint <tuned run>`
runs the tuned model. A run directory with checkpoints resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import shutil
import time
from typing import Callable, Sequence

import jax
import numpy as np

from llm_jax.config import (ConfigError, ExperimentConfig, OptimConfig, SFTConfig, TrainConfig, override,
                            to_dict)
from llm_jax.data.tokenizers import Tokenizer, load_tokenizer
from llm_jax.finetune import data as sft_data
from llm_jax.finetune import peft, step as ft_step
from llm_jax.models import init_params
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.rules import param_shardings, sharding_context
from llm_jax.training.checkpoint import Checkpointer, load_trained_model
from llm_jax.training.loop import _check_batch, _check_resumable
from llm_jax.training.metrics import MetricsWriter, format_duration
from llm_jax.training.step import train_state_shardings

# Fine-tuning defaults: short schedules, a brief warmup, no weight decay pulling the tuned
# parameters (LoRA factors, prompts) towards zero.
FINETUNE_OPTIM = OptimConfig(lr=2e-4, warmup_steps=10, weight_decay=0.0, schedule="cosine", min_lr_ratio=0.1)
FINETUNE_TRAIN = TrainConfig(steps=300, batch_size=16, eval_every=100, eval_steps=10, log_every=20,
                             checkpoint_every=100, run_dir="runs/finetune", sample_tokens=64, sample_prompt="")


@dataclasses.dataclass
class FinetuneResult:
    run_dir: pathlib.Path
    step: int
    resumed_from: int | None
    train_loss: float | None
    validation_loss: float | None  # mean loss on the validation examples' response tokens
    tuned_params: int
    total_params: int
    samples: list[tuple[str, str, str]]  # (prompt, reference answer, generated answer)
    seconds: float


def finetune_config(base_dir: str | pathlib.Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A fine-tuning run of `base_dir`: its model, data and decode settings, fine-tuning
    defaults for the optimizer and schedule, `train.init_from` = the base, then `overrides`."""
    base_dir = pathlib.Path(base_dir).absolute()
    base = Checkpointer(base_dir / "checkpoints", async_save=False) if (base_dir / "checkpoints").is_dir() else None
    if base is None or not base.steps():
        raise FileNotFoundError(f"{base_dir} is not a run directory with a checkpoint (an llm_jax run, or a Hugging "
                                f"Face checkpoint converted with `llm-jax convert --from-hf`)")
    try:
        base_cfg = base.saved_config()
    finally:
        base.close()
    cfg = dataclasses.replace(base_cfg, name=f"{base_cfg.name}-finetune", optim=FINETUNE_OPTIM,
                              train=dataclasses.replace(FINETUNE_TRAIN, init_from=str(base_dir)), sft=SFTConfig())
    return override(cfg, list(overrides))


# ----------------------------------------------------------------------------- pieces


def _examples(cfg: SFTConfig):
    """(train, validation) examples: the validation file, else the tail of the training file."""
    if not cfg.train_path:
        raise ConfigError("sft.train_path: name a JSONL file of examples (llm-jax finetune --data FILE)")
    train = sft_data.read_jsonl(cfg.train_path)
    if cfg.validation_path:
        return train, sft_data.read_jsonl(cfg.validation_path)
    n_val = min(math.ceil(len(train) * cfg.validation_fraction), len(train) - 1)
    return (train[: len(train) - n_val], train[len(train) - n_val :]) if n_val > 0 else (train, [])


def _tokenizer(base_dir: pathlib.Path, run_dir: pathlib.Path) -> Tokenizer:
    """The base run's tokenizer, copied into the tuned run (generation reads it from there)."""
    if not (base_dir / "tokenizer").is_dir():
        raise FileNotFoundError(f"the base run {base_dir} has no tokenizer/ folder")
    if not (run_dir / "tokenizer").exists() and jax.process_index() == 0:
        shutil.copytree(base_dir / "tokenizer", run_dir / "tokenizer")
    return load_tokenizer(run_dir / "tokenizer")


def _check(cfg: ExperimentConfig, mesh, saved: ExperimentConfig | None, run_dir: pathlib.Path) -> int:
    """Rows per process, after checking the batch splits over the mesh and a resumed run fits."""
    local_batch = _check_batch(cfg, mesh)  # pretraining's check: the same batch layout
    if saved is not None:
        if saved.train.init_from != cfg.train.init_from:
            raise ConfigError(f"{run_dir} holds checkpoints of another run (train.init_from={saved.train.init_from!r}, "
                              f"not {cfg.train.init_from!r}); fine-tune into a new --out directory")
        if saved.model != cfg.model:
            raise ConfigError(f"{run_dir} holds checkpoints of a different model or PEFT config; use a new "
                              f"train.run_dir or the old settings")
        _check_resumable(saved, cfg, run_dir)  # data and optimizer too: another optimizer state would not restore
    return local_batch


def _start(cfg: ExperimentConfig, base_params, mesh):
    """(train state over the tuned half, frozen half), placed in their shardings."""
    model_cfg = cfg.model
    shardings = param_shardings(model_cfg, mesh)
    tuned_sh, frozen_sh = peft.split(shardings, model_cfg)
    rng, init_rng = jax.random.split(jax.random.key(cfg.train.seed))
    if model_cfg.peft.method == "none":
        tuned, frozen = base_params, {}
    else:
        peft.check_base(base_params, model_cfg)
        # Only the tuned half is an output, so the frozen half of this init is never computed.
        tuned = jax.jit(lambda r: peft.split(init_params(model_cfg, r), model_cfg)[0], out_shardings=tuned_sh)(init_rng)
        frozen = base_params
        if model_cfg.peft.method == "qlora":
            abstract = jax.eval_shape(lambda p: peft.quantize_base(p, model_cfg), frozen)
            frozen = jax.jit(lambda p: peft.quantize_base(p, model_cfg),
                             out_shardings=peft.frozen_shardings(abstract, frozen_sh))(frozen)
    init = lambda t, r: ft_step.init_state(t, cfg.optim, cfg.train.steps, r)  # noqa: E731
    abstract = jax.eval_shape(init, tuned, rng)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.jit(init, out_shardings=train_state_shardings(abstract, tuned_sh, replicated))(tuned, rng)
    return state, frozen


def _evaluate(state, frozen, batches, model_cfg, put) -> float | None:
    if not batches:
        return None
    sums = [ft_step.eval_step(state.params, frozen, put(b), model_cfg=model_cfg) for b in batches]
    loss, tokens = (sum(float(s[k]) for s in sums) for k in ("loss_sum", "tokens"))
    return loss / max(tokens, 1.0)


def sample_answers(params, cfg: ExperimentConfig, tokenizer: Tokenizer, examples, n: int = 3):
    """Greedy answers to the first `n` examples' prompts: [(prompt, reference, answer)]."""
    from llm_jax.inference import generate

    template = sft_data.get_template(cfg.sft.template)
    out = []
    for messages in examples[:n]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids = sft_data.encode_prompt(messages[:last], template, tokenizer)
        prompt = tokenizer.decode(ids)
        room = cfg.model.max_seq_len - len(ids)
        if room < 2:
            continue
        gen = generate(params, cfg.model, [ids], max_new_tokens=min(cfg.train.sample_tokens, room - 1),
                       sampling={"temperature": 0.0}, stop_tokens=[tokenizer.eos_id], tokenizer=tokenizer)
        out.append((prompt, messages[last]["content"], gen.texts[0]))
    return out


# ------------------------------------------------------------------------------ finetune


def finetune(cfg: ExperimentConfig, *, print_fn: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tune `cfg.train.init_from` on `cfg.sft` data in `cfg.train.run_dir` (resuming if it has checkpoints)."""
    if not cfg.train.init_from:
        raise ConfigError("train.init_from: fine-tuning needs a base run directory (llm-jax finetune --base RUN_DIR)")
    base_dir, run_dir = pathlib.Path(cfg.train.init_from).absolute(), pathlib.Path(cfg.train.run_dir)
    if run_dir.absolute().resolve() == base_dir.resolve():
        raise ConfigError(f"train.run_dir={run_dir} is the base run itself; fine-tune into a new --out directory "
                          f"(the base's checkpoints must stay as they are)")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(base_dir)))
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    mesh = make_mesh(cfg.mesh)
    local_batch = _check(cfg, mesh, checkpointer.newest_readable_config() if checkpointer.steps() else None, run_dir)
    tokenizer = _tokenizer(base_dir, run_dir)
    template = sft_data.get_template(cfg.sft.template)
    train_examples, val_examples = _examples(cfg.sft)
    seq_len = cfg.data.seq_len
    pipeline = dict(tokenizer=tokenizer, template=template, seq_len=seq_len, batch_size=local_batch,
                    train_on_prompt=cfg.sft.train_on_prompt, process_index=jax.process_index(),
                    process_count=jax.process_count())
    train_iter = iter(sft_data.sft_batches(train_examples, train=True, seed=cfg.train.seed, **pipeline))
    val_batches = list(sft_data.sft_batches(val_examples, train=False, **pipeline))[: cfg.train.eval_steps or None] \
        if val_examples and cfg.train.eval_steps else []
    encoded = [sft_data.encode(m, template, tokenizer) for m in train_examples]
    if not cfg.sft.train_on_prompt and not any(mask[1 : seq_len + 1].any() for _, mask in encoded):
        raise ConfigError(f"data.seq_len={seq_len}: no training example has a response token within its first "
                          f"{seq_len + 1} tokens (every prompt is longer), so nothing would train; raise "
                          f"data.seq_len (up to model.max_seq_len={cfg.model.max_seq_len})")
    too_long = sum(len(ids) > seq_len + 1 for ids, _ in encoded)
    if too_long:  # kept, cut at their end (their answers lose their tail, or all of it)
        print_fn(f"warning: {too_long} of {len(train_examples)} training examples are longer than data.seq_len + 1 = "
                 f"{seq_len + 1} tokens and are cut to that length; raise data.seq_len (up to model.max_seq_len="
                 f"{cfg.model.max_seq_len}) to keep them whole")
    n_tuned, n_total = peft.count_tuned(cfg.model)
    print_fn(f"fine-tuning {base_dir} with model.peft.method={cfg.model.peft.method}: {n_tuned:,} of {n_total:,} "
             f"parameters train ({n_tuned / n_total:.2%}); {len(train_examples):,} training and "
             f"{len(val_examples):,} validation examples, template {cfg.sft.template!r}")

    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    put = lambda b: {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in b.items()}  # noqa: E731
    base_cfg, base_params, base_step = load_trained_model(base_dir, mesh=mesh)
    if base_cfg.model.peft.method != "none":
        raise ValueError(f"the base run {base_dir} is itself a PEFT run (model.peft.method="
                         f"{base_cfg.model.peft.method!r}); fine-tune its base, or merge its LoRA first")
    with sharding_context(mesh):
        state, frozen = _start(cfg, base_params, mesh)
        restored = checkpointer.restore_latest(state, train_iter)
        resumed_from = None if restored is None else int(restored.step)
        state = state if restored is None else restored
        print_fn(f"resumed from step {resumed_from}" if restored is not None else
                 f"starting from {base_dir} (step {base_step})")
        writer = MetricsWriter(run_dir, tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb, config=to_dict(cfg))
        try:
            state, summary = _loop(cfg, state, frozen, train_iter, val_batches, put, batch_sharding, checkpointer,
                                   writer, print_fn)
            checkpointer.wait()
            samples = []
            if cfg.train.sample_tokens and val_examples:
                samples = sample_answers(peft.combine(state.params, frozen), cfg, tokenizer, val_examples)
        finally:
            writer.close()
            checkpointer.close()
    for prompt, reference, answer in samples:
        print_fn(f"--- prompt:\n{prompt}\n--- reference: {reference!r}\n--- answer:    {answer!r}")
    return FinetuneResult(run_dir=run_dir, resumed_from=resumed_from, tuned_params=n_tuned, total_params=n_total,
                          samples=samples, **summary)


def _loop(cfg, state, frozen, train_iter, val_batches, put, batch_sharding, checkpointer, writer, print_fn):
    """Step to `train.steps`, logging, evaluating and checkpointing on schedule."""
    tc = cfg.train
    step_fn = ft_step.sharded_train_step(state, frozen, batch_sharding, model_cfg=cfg.model,
                                         microbatches=tc.microbatches, z_loss=tc.z_loss)
    step, pending = int(state.step), []
    train_loss = validation_loss = None
    start = last_log = time.perf_counter()
    while step < tc.steps:
        state, metrics = step_fn(state, frozen, put(next(train_iter)))
        step += 1
        pending.append(metrics)
        last = step == tc.steps
        if step % tc.log_every == 0 or last:
            fetched, pending = jax.device_get(pending), []
            if int(fetched[-1]["bad_in_a_row"]) >= tc.max_bad_steps:
                raise RuntimeError(f"{tc.max_bad_steps} consecutive non-finite steps up to step {step}; "
                                   f"lower optim.lr or set optim.grad_clip")
            train_loss = float(np.mean([m["loss"] for m in fetched if not m["skipped"]] or [math.nan]))
            now = time.perf_counter()
            tok_s = sum(float(m["tokens"]) for m in fetched) / (now - last_log)
            writer.write(step, {"train/loss": train_loss, "train/trained_tokens_per_second": tok_s,
                                "train/grad_norm": float(np.mean([m["grad_norm"] for m in fetched]))})
            print_fn(f"step {step:>5}/{tc.steps} | loss {train_loss:.4f} | {tok_s:,.0f} trained tok/s | "
                     f"{format_duration(now - start)} elapsed")
            last_log = now
        evaluated = None
        if val_batches and (step % tc.eval_every == 0 or last):
            validation_loss = evaluated = _evaluate(state, frozen, val_batches, cfg.model, put)
            writer.write(step, {"validation/loss": validation_loss})
            print_fn(f"step {step:>5}/{tc.steps} | validation loss {validation_loss:.4f} (response tokens)")
        if step % tc.checkpoint_every == 0 or last:
            checkpointer.save(state, train_iter, cfg, validation_loss=evaluated)
    seconds = time.perf_counter() - start
    return state, dict(step=step, train_loss=train_loss, validation_loss=validation_loss, seconds=seconds)
