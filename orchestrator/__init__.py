"""Control plane: sweep spec -> plan -> Ray Tune -> MLflow, and the analysis that reads it back."""
