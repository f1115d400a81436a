"""The training loop: `train(config)` takes an experiment from corpus to checkpointed model.

    corpus (tfds) -> tokenizer -> grain packed batches -> jitted train_step -> orbax
                                                          \\-> eval, metrics, sample

A run lives in `train.run_dir`: `metrics.jsonl`, `tensorboard/`, `tokenizer/`,
`checkpoints/`. Starting a run in a directory that holds checkpoints resumes from the
newest complete one, data iterator included, so the losses continue exactly as if the
run had never stopped. With `train.distill_from` the loss is knowledge distillation to
that run's frozen model (`llm_jax.finetune.distill`); evaluation stays the student's CE.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from llm_jax.config import ConfigError, ExperimentConfig, to_dict
from llm_jax.data.pipeline import make_tokenizer, open_corpus, packed_batches
from llm_jax.data.tokenizers import Tokenizer, load_tokenizer
from llm_jax.evaluation.perplexity import evaluate_perplexity, validation_batches
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.pipeline import pipeline_runner
from llm_jax.parallel.rules import param_shardings, sharding_context
from llm_jax.training.checkpoint import Checkpointer, load_trained_model
from llm_jax.training.metrics import MetricsWriter, flops_per_token, format_duration, measured_peak_flops
from llm_jax.training.optimizer import learning_rate_schedule
from llm_jax.training.step import init_sharded_train_state, sharded_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
    run_dir: pathlib.Path
    step: int
    resumed_from: int | None
    train_loss: float | None
    validation: dict[str, float] | None  # loss, perplexity, bits_per_byte
    skipped_steps: int
    tokens_per_second: float
    seconds: float
    sample: str | None


# ------------------------------------------------------------------------ setup helpers


def _check_batch(cfg: ExperimentConfig, mesh: jax.sharding.Mesh) -> int:
    """Rows per JAX process, after checking the batch splits evenly where it must."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % ways:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} with train.microbatches={cfg.train.microbatches} gives "
            f"{micro} rows per microbatch, which the {ways} data x fsdp devices of the mesh cannot split evenly"
        )
    if cfg.train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                          f"{jax.process_count()} JAX processes")
    if jax.process_count() > 1:
        # Each process reads its own rows of the batch: its devices must hold exactly those,
        # which needs the data axes to run across the processes.
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        rows = set()
        for index in sharding.addressable_devices_indices_map((cfg.train.batch_size,)).values():
            rows.update(range(*index[0].indices(cfg.train.batch_size)))
        if len(rows) * jax.process_count() != cfg.train.batch_size:
            raise ConfigError(
                f"mesh.data x mesh.fsdp = {ways} does not split the batch across the {jax.process_count()} JAX "
                f"processes (each process reads its own rows, so the data axes must span the processes): "
                f"make mesh.data * mesh.fsdp a multiple of {jax.process_count()}")
    return cfg.train.batch_size // jax.process_count()


def _check_resumable(saved: ExperimentConfig | None, cfg: ExperimentConfig, run_dir: pathlib.Path) -> None:
    """Refuse to resume a run whose model, data or optimizer changed: its checkpoint would not
    fit the new state (or would silently continue under other settings)."""
    if saved is None:
        return
    for section in ("model", "data", "optim"):
        old, new = to_dict(getattr(saved, section)), to_dict(getattr(cfg, section))
        changed = {k: (old[k], new[k]) for k in new if old.get(k) != new[k]}
        if changed:
            details = ", ".join(f"{section}.{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(f"{run_dir} holds checkpoints of a different {section} config ({details}); "
                              f"use a new train.run_dir or restore the old settings")


def _adopt_base_model(cfg: ExperimentConfig, base_dir: pathlib.Path, run_dir: pathlib.Path, print_fn):
    """Take the model config and tokenizer of the run directory whose weights start this run."""
    if not (base_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"train.init_from={base_dir} is not a run directory: it has no checkpoints/ folder")
    base = Checkpointer(base_dir / "checkpoints", async_save=False)
    try:
        if not base.steps():
            raise FileNotFoundError(f"train.init_from={base_dir} holds no complete checkpoint")
        base_cfg = base.saved_config()
    finally:
        base.close()
    if base_cfg.model != cfg.model:
        print_fn(f"train.init_from: using the model config of {base_dir} ({base_cfg.model.n_layers} layers, "
                 f"d_model {base_cfg.model.d_model}, vocabulary {base_cfg.model.vocab_size})")
        cfg = dataclasses.replace(cfg, model=base_cfg.model)
    tokenizer_dir = run_dir / "tokenizer"
    if (base_dir / "tokenizer").is_dir() and not tokenizer_dir.exists() and jax.process_index() == 0:
        shutil.copytree(base_dir / "tokenizer", tokenizer_dir)
    return cfg


def _adopt_teacher_vocabulary(cfg: ExperimentConfig, teacher_dir: pathlib.Path, run_dir: pathlib.Path) -> None:
    """A distilled student speaks its teacher's vocabulary: check the sizes, take its tokenizer."""
    if not (teacher_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"train.distill_from={teacher_dir} is not a run directory: it has no checkpoints/ folder")
    teacher = Checkpointer(teacher_dir / "checkpoints", async_save=False)
    try:
        if not teacher.steps():
            raise FileNotFoundError(f"train.distill_from={teacher_dir} holds no complete checkpoint")
        teacher_vocab = teacher.saved_config().model.vocab_size
    finally:
        teacher.close()
    if teacher_vocab != cfg.model.vocab_size:
        raise ConfigError(f"train.distill_from={teacher_dir} has model.vocab_size={teacher_vocab} but the student "
                          f"has model.vocab_size={cfg.model.vocab_size}; distillation needs one vocabulary")
    tokenizer_dir = run_dir / "tokenizer"
    if (teacher_dir / "tokenizer").is_dir() and not tokenizer_dir.exists() and jax.process_index() == 0:
        shutil.copytree(teacher_dir / "tokenizer", tokenizer_dir)


def _load_teacher(cfg: ExperimentConfig, mesh: jax.sharding.Mesh, run_dir: pathlib.Path, print_fn):
    """(objective, parameters) of the frozen teacher, placed like the student's on `mesh`."""
    from llm_jax.finetune.align_config import DistillConfig
    from llm_jax.finetune.distill import DistillationObjective

    tc, teacher_dir = cfg.train, pathlib.Path(cfg.train.distill_from)
    # A resumed student (or one given train.init_from) may hold a tokenizer of its own.
    theirs, ours = _files(teacher_dir / "tokenizer"), _files(run_dir / "tokenizer")
    if theirs and ours and theirs != ours:
        raise ConfigError(f"train.distill_from: the tokenizer of {teacher_dir} differs from the student's in "
                          f"{run_dir / 'tokenizer'}; distillation needs one vocabulary (use a new train.run_dir)")
    teacher_cfg, params, step = load_trained_model(teacher_dir, mesh=mesh)
    print_fn(f"distilling from {teacher_dir} (step {step}, {teacher_cfg.model.n_layers} layers, d_model "
             f"{teacher_cfg.model.d_model}) at temperature {tc.distill_temperature}, alpha {tc.distill_alpha}")
    objective = DistillationObjective(teacher_cfg.model, DistillConfig(temperature=tc.distill_temperature,
                                                                       alpha=tc.distill_alpha))
    return objective, params


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.is_dir() else {}


def _tokenizer(cfg: ExperimentConfig, corpus, run_dir: pathlib.Path) -> Tokenizer:
    """The run's tokenizer: the one saved in the run directory, else a new one saved there."""
    saved = run_dir / "tokenizer"
    if (saved / "tokenizer.json").exists():
        tokenizer = load_tokenizer(saved)
        # One this run trained on the fly earlier must be what the config asks for (a base
        # run's or a teacher's, copied in for train.init_from / distill_from, is adopted as is).
        kind = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8")).get("kind")
        adopted = cfg.train.init_from or cfg.train.distill_from or cfg.data.tokenizer_path
        if not adopted and kind != cfg.data.tokenizer:
            raise ConfigError(f"{saved} holds a {kind} tokenizer from an earlier start of this run, but "
                              f"data.tokenizer={cfg.data.tokenizer!r}; use a new train.run_dir, set "
                              f"data.tokenizer={kind!r}, or delete {saved}")
    else:
        tokenizer = make_tokenizer(cfg.data, corpus, cfg.model.vocab_size)
        if jax.process_index() == 0:
            tokenizer.save(saved)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                          f"{cfg.model.vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size}")
    return tokenizer


# ------------------------------------------------------------------------------ train


class _Run:
    """State shared by the loop's pieces; `train()` below is the entry point."""

    def __init__(self, cfg: ExperimentConfig, run_dir: pathlib.Path, print_fn: Callable[[str], None]):
        self.cfg, self.run_dir, self.print = cfg, run_dir, print_fn
        self.mesh = make_mesh(cfg.mesh)
        self.local_batch = _check_batch(cfg, self.mesh)
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        self.schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
        self.layer_runner = pipeline_runner(self.mesh, cfg.mesh, cfg.model.n_layers,
                                            cfg.train.batch_size // cfg.train.microbatches)
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len) * self.tokens_per_step
        self.loss_fn, self.teacher = None, None  # the step's objective: next-token CE unless distilling

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

    def evaluate(self, params, batches, n_bytes) -> dict[str, float]:
        return evaluate_perplexity(params, self.cfg.model, batches, n_bytes, put=self.device_batch)


def train(cfg: ExperimentConfig, *, run_dir: str | pathlib.Path | None = None,
          print_fn: Callable[[str], None] = print) -> TrainResult:
    """Train `cfg` in `run_dir` (default `cfg.train.run_dir`), resuming if it holds checkpoints."""
    run_dir = pathlib.Path(run_dir or cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    resuming = bool(checkpointer.steps())
    if cfg.train.init_from:
        cfg = _adopt_base_model(cfg, pathlib.Path(cfg.train.init_from), run_dir, print_fn)
    if cfg.train.distill_from:
        _adopt_teacher_vocabulary(cfg, pathlib.Path(cfg.train.distill_from), run_dir)
    _check_resumable(checkpointer.newest_readable_config() if resuming else None, cfg, run_dir)
    run = _Run(cfg, run_dir, print_fn)

    corpus = open_corpus(cfg.data)
    tokenizer = _tokenizer(cfg, corpus, run_dir)
    pipeline = dict(tokenizer=tokenizer, seq_len=cfg.data.seq_len, batch_size=run.local_batch,
                    process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = iter(packed_batches(corpus.train, train=True, seed=cfg.train.seed, **pipeline))
    print_fn(f"corpus {corpus.name}: {len(corpus.train):,} training and {len(corpus.validation):,} validation "
             f"documents; {type(tokenizer).__name__} with {tokenizer.vocab_size:,} ids")
    val_batches, val_bytes = validation_batches(corpus.validation, n_batches=cfg.train.eval_steps,
                                                vocab_size=cfg.model.vocab_size, **pipeline)
    if jax.process_count() > 1:  # each process scores its own rows; bits per byte needs all their bytes
        # Every process must run the same evaluation steps (each is a collective): the fewest any has.
        n_val = int(multihost_utils.process_allgather(np.asarray(len(val_batches))).min())
        if n_val < len(val_batches):
            val_batches, val_bytes = validation_batches(corpus.validation, n_batches=n_val,
                                                        vocab_size=cfg.model.vocab_size, **pipeline)
        val_bytes = int(multihost_utils.process_allgather(np.asarray(val_bytes)).sum())
    if cfg.train.eval_steps and not val_batches:
        raise ValueError(f"the validation split ({len(corpus.validation)} documents) is too short for one batch "
                         f"of {run.local_batch} x {cfg.data.seq_len} tokens; raise data.validation_fraction")

    shardings = param_shardings(cfg.model, run.mesh)
    peak = measured_peak_flops()  # outside the mesh context: it runs on this process's devices alone
    with sharding_context(run.mesh):
        if cfg.train.distill_from:
            run.loss_fn, run.teacher = _load_teacher(cfg, run.mesh, run_dir, print_fn)
        state = init_sharded_train_state(cfg.model, cfg.optim, cfg.train.steps, jax.random.key(cfg.train.seed),
                                         run.mesh, shardings, shard_params=cfg.mesh.shard_params,
                                         offload_optimizer=cfg.mesh.offload_optimizer)
        restored = checkpointer.restore_latest(state, train_iter)
        if restored is None and cfg.train.init_from:
            _, base, step = load_trained_model(cfg.train.init_from, mesh=run.mesh)
            state = state.replace(params=jax.device_put(base, jax.tree.map(lambda x: x.sharding, state.params)))
            print_fn(f"starting from the parameters of {cfg.train.init_from} (step {step}), fresh optimizer state")
        resumed_from = None
        if restored is not None:
            state, resumed_from = restored, int(restored.step)
            print_fn(f"resumed from step {resumed_from} in {run_dir}")
        writer = MetricsWriter(run_dir, tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb, config=to_dict(cfg))
        try:
            state, summary = _loop(run, state, train_iter, val_batches, val_bytes, checkpointer, writer, peak)
            checkpointer.wait()
            sample = _sample(run, state.params, tokenizer) if cfg.train.sample_tokens else None
        finally:
            writer.close()
            checkpointer.close()
    result = TrainResult(run_dir=run_dir, resumed_from=resumed_from, sample=sample, **summary)
    _print_summary(run, result)
    return result


def _loop(run: _Run, state, train_iter, val_batches, val_bytes, checkpointer, writer, peak: float):
    """Step until `train.steps`, logging, evaluating and checkpointing on schedule."""
    cfg, tc = run.cfg, run.cfg.train
    step = int(state.step)
    bar = tqdm(total=tc.steps, initial=step, disable=None if tc.progress_bar else True, unit="step",
               dynamic_ncols=True, leave=False)
    step_fn = sharded_train_step(state, run.batch_sharding, model_cfg=cfg.model, microbatches=tc.microbatches,
                                 z_loss=tc.z_loss, layer_runner=run.layer_runner, loss_fn=run.loss_fn,
                                 teacher=run.teacher)
    pending: list[dict] = []  # device metrics since the last log line (fetched together)
    previous = None
    last_log, start = time.perf_counter(), time.perf_counter()
    first_step, train_loss, validation, tokens_seen = step, None, None, 0.0
    while step < tc.steps:
        batch = run.device_batch(next(train_iter))
        state, metrics = step_fn(state, batch)
        step += 1
        pending.append(metrics)
        # Reading the previous step's counter waits only for that step, not the one just queued;
        # the last step's own counter is read before the final save.
        last = step == tc.steps
        for checked, upto in ((previous, step - 1), (metrics if last else None, step)):
            if checked is not None and int(checked["bad_in_a_row"]) >= tc.max_bad_steps:
                raise TrainingDiverged(
                    f"{tc.max_bad_steps} consecutive steps (up to step {upto}) had a non-finite loss or gradient "
                    f"(train.max_bad_steps={tc.max_bad_steps}); stopping. Try a lower optim.lr, optim.grad_clip, "
                    f"or float32 compute (model.dtype=float32)")
        previous = metrics
        bar.update(1)
        if step % tc.log_every == 0 or last:
            fetched = jax.device_get(pending)
            pending = []
            now = time.perf_counter()
            tokens = sum(m["tokens"] for m in fetched)
            tokens_seen += tokens
            train_loss = float(np.mean([m["loss"] for m in fetched if not m["skipped"]] or [math.nan]))
            tok_s = tokens / (now - last_log)
            scalars = {
                "train/loss": train_loss, "train/grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
                "train/learning_rate": float(run.schedule(step - 1)), "train/tokens_per_second": tok_s,
                "train/mfu": tok_s / run.tokens_per_step * run.flops_per_step / peak,
                "train/skipped_steps": float(sum(m["skipped"] for m in fetched)),
                # A distilled student's two terms (train/loss is their mix).
                **{f"train/{k}": float(np.mean([m[k] for m in fetched if not m["skipped"]] or [math.nan]))
                   for k in ("kl_to_teacher", "label_ce") if k in fetched[0]},
            }
            writer.write(step, scalars)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{scalars['train/mfu']:.1%}")
            eta = (now - start) / (step - first_step) * (tc.steps - step)
            bar.write(f"step {step:>6}/{tc.steps} | loss {train_loss:.4f} | lr {scalars['train/learning_rate']:.2e} | "
                      f"grad {scalars['train/grad_norm']:.3f} | {tok_s:,.0f} tok/s | MFU {scalars['train/mfu']:.1%} | "
                      f"{format_duration(now - start)} elapsed, {format_duration(eta)} left")
            last_log = now
        validation_loss = None
        if val_batches and (step % tc.eval_every == 0 or last):
            validation = run.evaluate(state.params, val_batches, val_bytes)
            validation_loss = validation["loss"]
            writer.write(step, {f"validation/{k}": v for k, v in validation.items()})
            bar.write(f"step {step:>6}/{tc.steps} | validation loss {validation['loss']:.4f} | "
                      f"perplexity {validation['perplexity']:.2f} | bits/byte {validation['bits_per_byte']:.4f}")
        if step % tc.checkpoint_every == 0 or last:
            checkpointer.save(state, train_iter, cfg, validation_loss=validation_loss)
    bar.close()
    seconds = time.perf_counter() - start
    summary = dict(step=step, train_loss=train_loss, validation=validation, skipped_steps=int(state.skipped),
                   tokens_per_second=tokens_seen / seconds if seconds else 0.0, seconds=seconds)
    return state, summary


def _sample(run: _Run, params, tokenizer: Tokenizer) -> str:
    """A completion of `train.sample_prompt` with the experiment's decode settings."""
    from llm_jax.inference import generate

    tc, decode = run.cfg.train, run.cfg.decode
    n_new = min(tc.sample_tokens, run.cfg.model.max_seq_len - 1)
    prompt = tokenizer.encode(tc.sample_prompt)[-(run.cfg.model.max_seq_len - n_new):] or [tokenizer.eos_id]
    out = generate(params, run.cfg.model, [prompt], max_new_tokens=n_new, sampling=decode.sampling(),
                   stop_tokens=[tokenizer.eos_id], tokenizer=tokenizer, seed=decode.seed)
    return tc.sample_prompt + out.texts[0]


def _print_summary(run: _Run, result: TrainResult) -> None:
    p = run.print
    p(f"\n{run.cfg.name}: {result.step} steps in {format_duration(result.seconds)} "
      f"({result.tokens_per_second:,.0f} tokens/s), run directory {result.run_dir}")
    if result.resumed_from is not None:
        p(f"  resumed from step {result.resumed_from}")
    if result.train_loss is not None:
        p(f"  train loss       {result.train_loss:.4f}")
    if result.validation:
        v = result.validation
        p(f"  validation loss  {v['loss']:.4f}   perplexity {v['perplexity']:.2f}   bits/byte {v['bits_per_byte']:.4f}")
    if result.skipped_steps:
        p(f"  skipped steps    {result.skipped_steps} (non-finite loss or gradient)")
    if result.sample is not None:
        p(f"  sample (temperature {run.cfg.decode.temperature}):\n" + "\n".join("    " + line for line in result.sample.splitlines()))
