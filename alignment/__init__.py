"""Fine-tuning and alignment stages: instruction data, SFT, reward model, DPO, PPO (each an entry script)."""
