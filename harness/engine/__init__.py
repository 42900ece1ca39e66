"""Engine: one run's training loop, budgets, checkpoints, seeding, feature extraction and evaluation,
data-parallel helpers and the optional training loggers."""
