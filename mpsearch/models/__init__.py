"""Models and their fp32 baselines: the timm zoo, the small-image adaptation, baseline training and the
baseline's cached per-image correctness."""
