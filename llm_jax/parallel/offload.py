"""Host offloading: keep the optimizer state in pinned host memory between steps.

Adam's two moments are twice the parameters; parked on the host (`mesh.offload_optimizer`)
they cost device memory only while the update runs. The train step moves them onto the
device at its start and back at its end (`jax.device_put` to a sharding with another
memory kind, inside jit, so XLA schedules the copies), and their shardings otherwise stay
the same: an FSDP-split moment is still split, just in host memory.

Activations are offloaded by a remat policy instead (`model.remat=offload_attention_mlp_out`,
see `llm_jax/models/transformer.py`), which XLA handles the same way.

Whether a backend offers host memory is a property of its devices: GPUs and TPUs have a
`pinned_host` memory kind, and so does jaxlib's CPU backend (0.10.x); one without it is
refused before anything is compiled.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

HOST = "pinned_host"


class OffloadUnsupported(ValueError):
    """The devices have no pinned host memory to offload into."""


def memory_kinds(device: jax.Device) -> list[str]:
    return [m.kind for m in device.addressable_memories()]


def check_host_offload(devices: Sequence[jax.Device], what: str = "mesh.offload_optimizer=true") -> None:
    """Refuse offloading on devices without a `pinned_host` memory, naming what they have."""
    for device in devices:
        kinds = memory_kinds(device)
        if HOST not in kinds:
            raise OffloadUnsupported(
                f"{what} needs a {HOST!r} memory kind, but {device.platform} device {device.id} offers only "
                f"{kinds}; turn offloading off on this backend")


def on_host(shardings: Any) -> Any:
    """The same shardings, in pinned host memory."""
    return jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings)


def optimizer_state_on_host(state_shardings: Any) -> Any:
    """A train state's shardings with its optimizer state in pinned host memory (refused
    on devices without one), for the jitted init and the ahead-of-time compile alike."""
    opt_shardings = state_shardings.opt_state
    check_host_offload({d for s in jax.tree.leaves(opt_shardings) for d in s.device_set})
    return state_shardings.replace(opt_state=on_host(opt_shardings))


def is_on_host(shardings: Any) -> bool:
    return any(getattr(s, "memory_kind", None) == HOST for s in jax.tree.leaves(shardings))


def optimizer_on_device(step: Callable, opt_shardings: Any) -> Callable:
    """Wrap a `step(state, batch)` so a host-resident optimizer state visits the device for it.

    A no-op when the optimizer state is already in device memory.
    """
    if not is_on_host(opt_shardings):
        return step
    on_device = jax.tree.map(lambda s: s.with_memory_kind(_device_kind(s)), opt_shardings)

    def wrapped(state, *inputs):  # the batch, and any frozen inputs of the step
        state = state.replace(opt_state=jax.device_put(state.opt_state, on_device))
        new_state, metrics = step(state, *inputs)
        return new_state.replace(opt_state=jax.device_put(new_state.opt_state, opt_shardings)), metrics

    return wrapped


def _device_kind(sharding: jax.sharding.NamedSharding) -> str:
    return sharding.mesh.devices.flat[0].default_memory().kind
