"""The memory planner: estimates against the compiler, refused layouts, proposals, `llm-jax plan`."""

import dataclasses
import re

import pytest

from llm_jax.cli import main
from llm_jax.config import ConfigError, DataConfig, ExperimentConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from llm_jax.parallel import aot, planner

BASE = ExperimentConfig(
    name="tiny",
    model=ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64),
    optim=OptimConfig(warmup_steps=1),
    data=DataConfig(seq_len=64),
    train=TrainConfig(steps=10, batch_size=16),
)


def _cfg(mesh: MeshConfig, microbatches: int = 1, **model) -> ExperimentConfig:
    return dataclasses.replace(BASE, mesh=mesh, model=dataclasses.replace(BASE.model, **model),
                               train=dataclasses.replace(BASE.train, microbatches=microbatches))


# Three layouts with different dominant terms: FSDP x tensor with full remat and gradient
# accumulation; data x pipeline (GPipe); ZeRO-1 with grouped-query attention and no remat.
COMPARED = {
    "fsdp4_tensor2_full_remat_2_microbatches": _cfg(MeshConfig(data=1, fsdp=4, tensor=2), 2, remat="full"),
    "data4_pipeline2_gpipe": _cfg(MeshConfig(data=4, pipeline=2)),
}
ZERO1_OVERRIDES = ["mesh.data=2", "mesh.fsdp=4", "mesh.shard_params=false", "model.n_kv_heads=2"]


@pytest.mark.parametrize("name", list(COMPARED))
def test_estimate_is_within_15_percent_of_the_compiled_step(name):
    cfg = COMPARED[name]
    estimate = planner.estimate_memory(cfg, 8)
    compiled = aot.CompiledMemory.of(aot.compile_train_step(cfg))
    assert compiled.device_total > 0
    assert abs(estimate.device_total / compiled.device_total - 1) <= 0.15, (estimate, compiled)


def test_plan_command_compiles_ahead_of_time_and_agrees_with_the_compiler(capsys, tmp_path):
    experiment = tmp_path / "tiny.py"
    experiment.write_text(
        "import dataclasses\n"
        "from llm_jax.config import *\n"
        f"def config():\n    return {BASE!r}\n")
    code = main(["plan", "--experiment", str(experiment), "--compile", "--devices", "8",
                 "--device-memory", "1GiB", *ZERO1_OVERRIDES])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ZeRO-1" in out and "fits" in out
    ratio = float(re.search(r"estimate / compiled = ([0-9.]+)", out).group(1))
    assert 0.85 <= ratio <= 1.15, out


def test_plan_command_proposes_settings_when_the_memory_is_too_small(capsys):
    code = main(["plan", "--experiment", "debug", "--devices", "8", "--device-memory", "1MiB"])
    out = capsys.readouterr().out
    assert code == 1 and "does NOT fit" in out
    proposals = [line.split(None, 2)[2] for line in out.splitlines() if "mesh.data=" in line]
    assert proposals, out


def test_proposals_fit_and_come_cheapest_first():
    cfg = _cfg(MeshConfig())
    full = planner.estimate_memory(cfg, 8).device_total
    budget = full // 2
    proposals = planner.propose(cfg, 8, budget, headroom=1.0, limit=50)
    assert proposals
    costs = [planner.REMAT_BY_COST.index(p.remat) for p in proposals]
    assert costs == sorted(costs)
    for p in proposals[:5]:
        assert p.estimate.device_total <= budget
        from llm_jax.config import override

        again = planner.estimate_memory(override(cfg, p.overrides()), 8)
        assert again == p.estimate  # the printed overrides select exactly the planned layout
    # A budget nothing can meet gets no proposal rather than a wrong one.
    assert planner.propose(cfg, 8, 1024) == []


def test_offloading_moves_bytes_from_device_to_host():
    plain = planner.estimate_memory(_cfg(MeshConfig(data=2, fsdp=4)), 8)
    offloaded = planner.estimate_memory(_cfg(MeshConfig(data=2, fsdp=4, offload_optimizer=True),
                                             remat="offload_attention_mlp_out"), 8)
    assert offloaded.optimizer == 0 and offloaded.host > plain.optimizer
    assert offloaded.activations < plain.activations
    # The state still visits the device for the update: where it outweighs the activations
    # (freed by then), offloading saves only the difference.
    wide_and_short = dataclasses.replace(_cfg(MeshConfig(data=2, fsdp=4), d_model=256, d_ff=1024),
                                         data=DataConfig(seq_len=8), train=dataclasses.replace(BASE.train, batch_size=8))
    plain = planner.estimate_memory(wide_and_short, 8)
    offloaded = planner.estimate_memory(dataclasses.replace(
        wide_and_short, mesh=MeshConfig(data=2, fsdp=4, offload_optimizer=True)), 8)
    assert plain.optimizer > plain.activations and offloaded.host == plain.optimizer
    assert offloaded.device_total == plain.params + plain.gradients + plain.optimizer


@pytest.mark.parametrize("mesh, model, batch, message", [
    (MeshConfig(data=3), {}, 16, r"has 3 devices but 8 are available"),
    (MeshConfig(data=8), {}, 12, r"12 rows per microbatch, which mesh.data x mesh.fsdp = 8 x 1 = 8 devices"),
    (MeshConfig(data=1, tensor=8), {}, 16, r"axis '(kv_)?heads' of size 4 cannot be split 8 ways"),
    (MeshConfig(data=2, pipeline=4), {"n_layers": 6}, 16, r"n_layers=6 cannot be cut into 4 pipeline stages"),
    (MeshConfig(data=4, pipeline=2), {"dropout": 0.1}, 16, r"mesh.pipeline=2 needs .* no dropout"),
    (MeshConfig(data=4, pipeline=2), {"scan_layers": False}, 16, r"model.scan_layers=False"),
])
def test_layouts_that_cannot_work_are_refused_before_compiling(mesh, model, batch, message):
    cfg = dataclasses.replace(_cfg(mesh, **model), train=dataclasses.replace(BASE.train, batch_size=batch))
    with pytest.raises(ValueError, match=message):
        planner.estimate_memory(cfg, 8)
    with pytest.raises(ValueError, match=message):
        aot.compile_train_step(cfg)  # refused before tracing anything


def test_sizes_parse_and_bad_ones_are_named():
    assert planner.parse_bytes("16GiB") == 16 * 2**30
    assert planner.parse_bytes("80GB") == 80 * 10**9
    assert planner.parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="'lots' is not a size"):
        planner.parse_bytes("lots")


def test_a_tpu_topology_without_libtpu_says_what_to_do_instead():
    with pytest.raises(ValueError, match=r"--devices N"):
        aot.topology_devices("v5e:2x2")


def test_refused_batch_message_lists_microbatch_counts_that_fit():
    cfg = dataclasses.replace(_cfg(MeshConfig(data=8)), train=dataclasses.replace(BASE.train, batch_size=16,
                                                                                    microbatches=4))
    with pytest.raises(ConfigError, match=r"microbatch counts that fit: \[1, 2\]"):
        planner.check_layout(cfg, 8)
