"""Non-IID partitions of a labelled pool of examples across clients."""

from __future__ import annotations

import numpy as np


def client_sizes(
    num_examples: int, num_clients: int, rng: np.random.Generator, *, sigma: float = 0.6
) -> np.ndarray:
    """Log-normal client sizes that sum to `num_examples`, each at least 2 (one support, one query).

    Real federated populations are unequal in size; a log-normal with sigma 0.6 gives a largest
    client several times the smallest.
    """
    if num_examples < 2 * num_clients:
        raise ValueError(
            f"{num_examples} examples cannot give {num_clients} clients two examples each; "
            "use fewer clients."
        )
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=num_clients)
    sizes = 2 + np.floor(weights / weights.sum() * (num_examples - 2 * num_clients)).astype(int)
    # Hand the rounding remainder to the largest clients, so the sizes add up exactly.
    remainder = num_examples - sizes.sum()
    sizes[np.argsort(-weights)[:remainder]] += 1
    return sizes


def dirichlet_label_partition(
    labels: np.ndarray,
    num_clients: int,
    concentration: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Splits example indices across clients with Dirichlet label skew and unequal sizes.

    Each client i draws a label distribution q_i ~ Dirichlet(concentration * p), where p is the
    pool's label distribution (Hsu et al., arXiv 1909.06335), and a size from `client_sizes`; it
    then draws its examples' labels from q_i, restricted to labels with examples left. Every example
    lands in exactly one client. Smaller concentration means stronger skew.

    Args:
      labels: Integer label of each example in the pool.
      num_clients: Number of clients.
      concentration: Dirichlet concentration (> 0).
      rng: Generator.

    Returns:
      A list of `num_clients` arrays of example indices.
    """
    if concentration <= 0:
        raise ValueError(f"Dirichlet concentration must be > 0, got {concentration}.")
    classes, counts = np.unique(labels, return_counts=True)
    prior = counts / counts.sum()
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    remaining = counts.astype(float)
    sizes = client_sizes(len(labels), num_clients, rng)
    clients = []
    for size in sizes:
        q = rng.dirichlet(concentration * prior * len(classes))
        taken = []
        for _ in range(size):
            p = q * (remaining > 0)
            # A client whose preferred labels ran out falls back to whatever is left.
            p = p / p.sum() if p.sum() > 0 else remaining / remaining.sum()
            c = rng.choice(len(classes), p=p)
            taken.append(pools[c].pop())
            remaining[c] -= 1
        clients.append(np.array(sorted(taken), dtype=np.int64))
    return clients


def label_skew(labels: np.ndarray, partition: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the pool's."""
    classes = np.unique(labels)
    pool = np.array([np.mean(labels == c) for c in classes])
    distances = []
    for idx in partition:
        client = np.array([np.mean(labels[idx] == c) for c in classes])
        distances.append(0.5 * np.abs(client - pool).sum())
    return float(np.mean(distances))
