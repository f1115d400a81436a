"""llm_jax: training and serving large language models with JAX and Flax."""

__version__ = "0.1.0"
