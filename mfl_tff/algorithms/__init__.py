"""Federated algorithms as `tff.learning.templates.LearningProcess`es over packed client data."""
