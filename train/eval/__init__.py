"""Evaluation: held-out perplexity and passkey retrieval of a pretrained model, chat exact match and tool calls
after SFT, reward-model pair accuracy, and the PPO report."""
