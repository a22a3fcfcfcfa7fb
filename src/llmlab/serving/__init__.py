"""Using a trained model: loading and chatting (`inference`), the MLflow model (`mlflow_model`), the CLI."""
