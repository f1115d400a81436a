"""Fine-tuning a trained model: supervised instruction tuning (SFT), parameter-efficient
tuning (LoRA, QLoRA, prefix / prompt / P-tuning, adapters) and alignment.

The PEFT layers themselves live in `llm_jax.models.peft` (enabled by `model.peft.*`, so a
plain `Transformer(cfg).apply` runs a tuned model); this package holds what training
needs on top: splitting tuned from frozen parameters, their optimizer, checkpoints, data.
"""

import importlib

# Alignment (reward model, DPO, PPO, distillation): names resolve on first use, so that
# importing the package (as `llm_jax.training.checkpoint` does for PEFT) stays cheap.
_ALIGNMENT = {
    "RewardConfig": "align_config", "DPOConfig": "align_config", "PPOConfig": "align_config",
    "DistillConfig": "align_config",
    "PreferencePair": "preference", "PreferenceData": "preference", "PreferenceDataError": "preference",
    "read_preference_pairs": "preference", "read_prompts": "preference", "encode_pairs": "preference",
    "preference_data": "preference",
    "train_reward_model": "reward", "reward_scores": "reward", "bradley_terry_loss": "reward",
    "train_dpo": "dpo", "dpo_loss": "dpo", "reference_logprobs": "dpo",
    "train_ppo": "ppo", "reward_model_fn": "ppo", "generalized_advantages": "ppo",
    "distillation_loss": "distill", "distill_train_step": "distill",
    "save_aligned_run": "runs", "load_reward_model": "runs",
}


def __getattr__(name):
    if name in _ALIGNMENT:
        return getattr(importlib.import_module(f"llm_jax.finetune.{_ALIGNMENT[name]}"), name)
    raise AttributeError(f"module 'llm_jax.finetune' has no attribute {name!r}")
