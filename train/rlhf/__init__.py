"""COOL RLHF building blocks (InternLM2's online PPO): advantages, reward shaping, PPO losses, diagnostics, and the
reward-hacking fast path. ``train.stages.ppo`` composes them into the PPO stage."""
