"""Pure-PyTorch side of the project: models, data, training loop, probes. No Ray, no MLflow."""
