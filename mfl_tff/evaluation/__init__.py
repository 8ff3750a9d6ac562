"""Personalization evaluation on held-out clients, as a federated computation, and its summaries."""
