"""Next-token cross-entropy with loss masks and the optional z-loss, computed in f32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_loss(logits_BTV, targets_BT, mask_BT=None, z_loss: float = 0.0):
    """Mean cross-entropy over unmasked tokens, plus `z_loss * log(Z)^2` (PaLM) if asked.

    Returns (loss, metrics) where metrics holds summed quantities (`loss_sum`, `tokens`)
    so that microbatches and devices can be combined exactly before dividing.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    mask_BT = jnp.ones(targets_BT.shape, jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = log_z_BT - target_logit_BT
    tokens = mask_BT.sum()
    loss_sum = (nll_BT * mask_BT).sum()
    z_sum = (jnp.square(log_z_BT) * mask_BT).sum()
    denominator = jnp.maximum(tokens, 1.0)
    loss = (loss_sum + z_loss * z_sum) / denominator
    return loss, {"loss_sum": loss_sum, "z_loss_sum": z_sum, "tokens": tokens}
