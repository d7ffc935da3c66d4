"""List-wise alignment of a trained recommender: Plackett–Luce rollouts, list rewards, and the
BLADE / static Best-of-N / GRPO / DPO weightings of one shared loss (see methods.py)."""
