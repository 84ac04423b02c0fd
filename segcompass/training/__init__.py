"""Training of the SegCompass head and policy: supervised segmentation (`supervised`), GRPO
(`grpo`, `grpo_trainer`, `grpo_step`), their losses, rewards and batching."""
