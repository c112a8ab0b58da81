"""Ray Train / Tune / Data and MLflow entry points: the only layer that imports ray or mlflow."""
