"""GRPO training loop: config, data, rewards, rollout, trainer, checkpoints, metrics, CLI."""
