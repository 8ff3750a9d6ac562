"""mfl_tff: meta-federated learning as TensorFlow Federated computations."""
