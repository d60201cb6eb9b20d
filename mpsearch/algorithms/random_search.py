"""Random search: the baseline every other algorithm must beat at the same budget."""

from __future__ import annotations

import numpy as np

from mpsearch.algorithms.base import SearchAlgorithm, fill, initial_batch, random_vectors, register_algorithm

__all__ = ["RandomSearch"]


@register_algorithm("random")
class RandomSearch(SearchAlgorithm):
    """Uniform random vectors from a seeded ``numpy`` Generator; results are ignored.

    Not sensitivity-seeded: a random baseline that started from the ILP's solutions would measure
    the seeds, not random search. The first batch is the initial vectors (the uniform policies)
    topped up with distinct random ones; later batches are ``population_size`` independent draws
    (a repeat of an earlier point is possible and the driver's cache answers it).
    """

    sensitivity_seeded = False

    def _setup(self, initial: list[np.ndarray]) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._initial = initial

    def _ask(self) -> list[np.ndarray]:
        if self.n_batches == 0:
            start = initial_batch(self.space, self._initial, self.population_size, self._rng)
            return list(fill(start, self.population_size, self.space, self._rng))
        return list(random_vectors(self.space, self.population_size, self._rng))

    def _state(self) -> dict:
        return {"rng": self._rng.bit_generator.state}

    def _tell(self, xs: list[np.ndarray], F: np.ndarray, failed: np.ndarray, violation: np.ndarray) -> None:
        pass  # random search does not learn
