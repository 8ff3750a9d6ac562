"""Pure-TensorFlow meta-learning math: inner loops, meta-gradients, meta-parameter shapes.

Nothing here knows about TFF placements; `mfl_tff.algorithms` wraps it in federated computations.
"""
