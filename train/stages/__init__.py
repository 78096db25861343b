"""The training stages, each a short module with a ``main`` entry point (``python -m train.stages.<name>``):
pretraining, SFT, the conditional reward model, and COOL RLHF's online PPO."""
