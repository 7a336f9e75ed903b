"""Pure RL algorithms for auto-thinking VLMs: rewards, advantages, BPO, losses, SSR, rethinking."""
