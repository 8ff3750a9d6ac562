"""mfl_tff: meta-federated learning as TensorFlow Federated computations."""

# Imported for its exit hook: it keeps TFF's unused default runtime from printing an error at
# interpreter exit, whichever mfl_tff module a program uses.
from mfl_tff.training import runtime as _runtime  # noqa: F401
