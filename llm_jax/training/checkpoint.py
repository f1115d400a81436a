"""Checkpoints with orbax: the train state, the data iterator and the config, together.

A checkpoint is one orbax step directory holding three items:

    state/   params, optimizer state, step, RNG and the skip counters (orbax PyTree)
    data/    the grain iterator's state, so a resumed run reads exactly the next batch
    config/  the ExperimentConfig as JSON

Saves are asynchronous (training goes on while the arrays are written) and atomic: orbax
writes into a temporary directory and renames it when complete, so a run killed during a
save leaves the previous checkpoints intact and the partial one is cleaned up on the next
start. The newest `keep` checkpoints are kept, plus the one with the best validation
loss. A checkpoint that fails to restore (truncated or corrupt files) is never used
silently: it is moved aside as `<step>.corrupt` and the next older one is tried.
"""

from __future__ import annotations

import logging
import pathlib
import warnings
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from llm_jax.config import ExperimentConfig, from_dict, to_dict
from llm_jax.training.step import TrainState

log = logging.getLogger(__name__)

VALIDATION_METRIC = "validation_loss"


def _state_tree(state: TrainState) -> dict[str, Any]:
    """The arrays of a TrainState as a plain dict (typed RNG keys stored as raw key data)."""
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
        "skipped": state.skipped,
        "bad_in_a_row": state.bad_in_a_row,
    }


def _abstract(tree):
    """ShapeDtypeStructs (with shardings) to restore into, so arrays land where they belong."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Save and restore training checkpoints in `directory` (one run's checkpoints)."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        preservation = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            # reverse=True makes BestN keep the *lowest* loss (pinned by a test).
            policies.BestN(get_metric_fn=lambda m: m[VALIDATION_METRIC], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            # Without best_fn orbax keeps the metrics in memory only, and a restarted run would
            # no longer know which checkpoint was best (and delete it).
            best_fn=lambda m: m[VALIDATION_METRIC], best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, data_iterator, config: ExperimentConfig, *, validation_loss=None):
        """Start an asynchronous save of the state at `state.step`."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return  # already saved (e.g. the final step coincides with a periodic save)
        metrics = None if validation_loss is None else {VALIDATION_METRIC: float(validation_loss)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(to_dict(config)),
            ),
            metrics=metrics,
            force=True,
        )

    def restore_latest(self, state: TrainState, data_iterator) -> TrainState | None:
        """Restore the newest readable checkpoint into (a copy of) `state` and `data_iterator`.

        Returns None when the directory holds no checkpoint. Unreadable checkpoints are
        moved aside with a warning and older ones tried.
        """
        initial = data_iterator.get_state()
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_abstract(_state_tree(state))),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                data_iterator.set_state(initial)  # its data item may have been read before the failure
                self._set_aside(step, e)
                continue
            tree = restored["state"]
            return state.replace(
                step=tree["step"],
                params=tree["params"],
                opt_state=tree["opt_state"],
                rng=jax.random.wrap_key_data(tree["rng"]),
                skipped=tree["skipped"],
                bad_in_a_row=tree["bad_in_a_row"],
            )
        return None

    def saved_config(self, step: int | None = None) -> ExperimentConfig | None:
        """The config stored with checkpoint `step` (default: the newest), if any."""
        steps = self.steps()
        if not steps:
            return None
        step = steps[-1] if step is None else step
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return from_dict(ExperimentConfig, saved["config"])

    def newest_readable_config(self) -> ExperimentConfig | None:
        """The config of the newest checkpoint whose config item reads; a checkpoint whose
        config does not read is moved aside like one whose state does not restore."""
        for step in reversed(self.steps()):
            try:
                return self.saved_config(step)
            except Exception as e:  # noqa: BLE001 - a damaged config item: fall back to the previous checkpoint
                self._set_aside(step, e)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        path = self.directory / str(step)
        target = self.directory / f"{step}.corrupt"
        message = (f"checkpoint {path} could not be restored ({type(error).__name__}: {error}); "
                   f"moved it to {target.name} and falling back to the previous checkpoint")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)
        if path.exists():
            if target.exists():
                target = self.directory / f"{step}.corrupt.{len(list(self.directory.glob(f'{step}.corrupt*')))}"
            path.rename(target)
        self.manager.reload()

    def wait(self) -> None:
        """Block until an asynchronous save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()



def save_model_checkpoint(run_dir: str | pathlib.Path, config: ExperimentConfig, params, *, step: int = 0,
                          extra: dict | None = None) -> pathlib.Path:
    """Write a run directory's checkpoint of parameters and config only (no optimizer or data
    state), at `step`: what `load_trained_model`, `generate`, `serve` and `train.init_from`
    read. `extra` adds trees next to the parameters (e.g. a reward model's value head)."""
    run_dir = pathlib.Path(run_dir)
    with ocp.CheckpointManager(run_dir / "checkpoints") as manager:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": step, "params": params, **(extra or {})}),
            config=ocp.args.JsonSave(to_dict(config)),
        ))
        manager.wait_until_finished()
    return run_dir


def load_trained_model(run_dir: str | pathlib.Path, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
    """(config, params, step) from a run directory's newest (or given) checkpoint.

    Only the parameters are read (the optimizer state stays on disk), straight into
    their shardings on `mesh` (heads and MLP split over `tensor`), or onto the first
    device without one. A PEFT run (`model.peft.method` set) stores only its tuned
    parameters; they come back combined with its base run's (`train.init_from`).
    """
    from llm_jax.models import abstract_params

    run_dir = pathlib.Path(run_dir)
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a training run directory: it has no checkpoints/ folder")
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        steps = checkpointer.steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint")
        if step is not None and step not in steps:
            raise ValueError(f"{directory} has no checkpoint at step {step}; it has steps {steps}")
        step = steps[-1] if step is None else step
        config = checkpointer.saved_config(step)

        abstract = abstract_params(config.model)
        if mesh is None:
            shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
        else:
            from llm_jax.parallel.rules import param_shardings

            shardings = param_shardings(config.model, mesh)
        peft_run = config.model.peft.method != "none"  # its checkpoint holds the tuned parameters only
        if peft_run:
            from llm_jax.finetune import peft

            abstract, shardings = peft.split(abstract, config.model)[0], peft.split(shardings, config.model)[0]
        restored = checkpointer.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"params": abstract},
                restore_args={"params": jax.tree.map(lambda x, s: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=s),
                                                     abstract, shardings)},
                partial_restore=True,
            )),
        )
        params = restored["state"]["params"]
        if peft_run:  # compose with the base run's weights (train.init_from)
            params = peft.with_base(params, config, mesh)
        return config, params, step
    finally:
        checkpointer.close()
