"""Registers the built-in tasks (imported by the registry on first use)."""

from mfl_tff.data import digits, emnist, sinusoid, synthetic
from mfl_tff.data.registry import register_task

register_task("digits", digits.build_digits, overwrite=True)
register_task("digits_fewshot", digits.build_digits_fewshot, overwrite=True)
register_task("sinusoid", sinusoid.build_sinusoid, overwrite=True)
register_task("synthetic", synthetic.build_synthetic, overwrite=True)
register_task("emnist", emnist.build_emnist, overwrite=True)
