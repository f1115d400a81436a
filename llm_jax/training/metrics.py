"""What a run reports: metrics files, TensorBoard, the progress bar, and MFU.

Every logged value goes to `metrics.jsonl` in the run directory (one JSON object per
line, appended, so a resumed run continues the same file) and, when enabled, to
TensorBoard event files (written with tensorboardX, no TensorFlow needed) and to
Weights & Biases if it is installed and asked for.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.models import count_params

log = logging.getLogger(__name__)


class MetricsWriter:
    """Append scalars to metrics.jsonl and, optionally, TensorBoard and W&B."""

    def __init__(self, run_dir: str | pathlib.Path, *, tensorboard: bool = True, wandb: bool = False,
                 config: dict | None = None):
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                log.warning("train.wandb=true but wandb is not installed; logging to JSONL and TensorBoard only")
            else:
                self._wandb = wandb_lib.init(dir=str(self.run_dir), config=config, resume="allow")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                if math.isfinite(value):  # the JSONL file keeps the NaNs; TensorBoard cannot plot them
                    self._tb.add_scalar(name, float(value), step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in the order they were written."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter plus attention scores.

    The usual estimate (Kaplan et al. 2020; PaLM appendix B): forward + backward cost
    6N for the matmuls with the weights, and 12 * layers * seq_len * d_model for the
    query-key and attention-value products. The embedding lookup is free; the output
    projection to the vocabulary is counted (it is a matmul even when tied).
    """
    n_embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    n_matmul = count_params(cfg) - n_embedding + cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 6.0 * n_matmul + attention


_PEAK_CACHE: dict[str, float] = {}


def measured_peak_flops(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of all local devices together on a large data-parallel matmul: the MFU denominator.

    Measured rather than looked up, so MFU is honest on any machine (a CPU has no
    datasheet peak worth quoting, and simulated CPU devices share the same cores).
    Cached per process.
    """
    devices = jax.local_devices()
    key = f"{devices[0].platform}-{len(devices)}-{jnp.dtype(dtype).name}-{size}"
    if key not in _PEAK_CACHE:
        mesh = jax.sharding.Mesh(np.array(devices), ("d",))
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
        # Host (numpy) inputs: under a global mesh context jnp would place them on every process's devices.
        x = jax.device_put(np.ones((len(devices) * size // 4, size), dtype), rows)
        w = jax.device_put(np.ones((size, size), dtype), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        matmul = jax.jit(lambda a, b: a @ b)
        matmul(x, w).block_until_ready()
        start = time.perf_counter()
        for _ in range(repeats):
            out = matmul(x, w)
        out.block_until_ready()
        seconds = (time.perf_counter() - start) / repeats
        _PEAK_CACHE[key] = 2 * x.shape[0] * size * size / seconds
    return _PEAK_CACHE[key]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
