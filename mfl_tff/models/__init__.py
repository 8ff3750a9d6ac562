"""Model builders: Keras architectures turned into `tff.learning.models.FunctionalModel`s."""

from mfl_tff.models.functional import functional_model, initial_weights
from mfl_tff.models.keras_models import mlp, small_cnn, softmax_regression

__all__ = ["functional_model", "initial_weights", "mlp", "small_cnn", "softmax_regression"]
