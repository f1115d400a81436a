"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A small text whose patterns a tiny model picks up in a few dozen steps."""
    rng = np.random.default_rng(0)
    names = ["anna", "bob", "carl", "dora", "eve"]
    lines = [f"{rng.choice(names)} gives {rng.integers(10)} apples to {rng.choice(names)}." for _ in range(3000)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
