"""Training: one worker's loop (`loop`), the Ray Train launcher (`launch`), checkpoints
(`checkpoint`), optimiser and schedule (`optim`), MLflow tracking (`tracking`)."""
