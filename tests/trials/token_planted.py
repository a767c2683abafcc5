"""A tiny planted token world for token-trial tests (numpy only, seeded).

Each sample has a class and its own detail (a latent ``z``). An image has a
CLS token of pure noise and ``PATCHES`` patch tokens of which only ``SIGNAL``
(at random positions) carry ``z``; they are marked by +3 on dimension 0,
the others by -3 and filled with large noise in the same dimensions as the
signal, so the mean of the patches drowns ``z``. A caption has 2-5 tokens,
each carrying ``z`` through another map plus a little noise. A head that
projects each token before pooling can keep the marked tokens and drop the
rest; a linear head on pooled features cannot.
"""

from __future__ import annotations

import numpy as np

from trials.token_trial import TokenTrialData, TokenZeroShotSet
from trials.tokens import RaggedTokens, TokenPairs

DIM_IMAGE, DIM_TEXT, LATENT, CLASSES, TEMPLATES = 16, 12, 6, 4, 2
PATCHES, SIGNAL, NOISE = 16, 2, 2.0


class World:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.standard_normal((CLASSES, LATENT)) * 1.5
        self.to_image = self.rng.standard_normal((LATENT, DIM_IMAGE - 1)) / np.sqrt(LATENT)
        self.to_text = self.rng.standard_normal((LATENT, DIM_TEXT)) / np.sqrt(LATENT)

    def latents(self, n: int):
        labels = self.rng.integers(CLASSES, size=n)
        return self.centres[labels] + 0.7 * self.rng.standard_normal((n, LATENT)), labels

    def images(self, z: np.ndarray) -> RaggedTokens:
        n = len(z)
        patches = np.empty((n, PATCHES, DIM_IMAGE))
        patches[:, :, 0] = -3.0
        patches[:, :, 1:] = NOISE * self.rng.standard_normal((n, PATCHES, DIM_IMAGE - 1))
        for i in range(n):
            where = self.rng.choice(PATCHES, SIGNAL, replace=False)
            patches[i, where, 0] = 3.0
            patches[i, where, 1:] = z[i] @ self.to_image + 0.1 * self.rng.standard_normal((SIGNAL, DIM_IMAGE - 1))
        cls = self.rng.standard_normal((n, 1, DIM_IMAGE))
        return RaggedTokens.from_padded(patches.astype(np.float32), np.ones((n, PATCHES), bool),
                                        cls.astype(np.float32))

    def texts(self, z: np.ndarray) -> RaggedTokens:
        n = len(z)
        lengths = self.rng.integers(2, 6, size=n)
        tokens = z[:, None] @ self.to_text[None] + 0.3 * self.rng.standard_normal((n, 5, DIM_TEXT))
        mask = np.arange(5)[None] < lengths[:, None]
        return RaggedTokens.from_padded(tokens.astype(np.float32), mask)

    def pairs(self, n: int, captions: int = 1):
        """``n`` images with ``captions`` captions each (caption-major within an image), and labels."""
        z, labels = self.latents(n)
        owner = np.repeat(np.arange(n), captions)
        return TokenPairs(self.images(z), self.texts(z[owner]), owner), labels

    def zero_shot(self, n: int) -> TokenZeroShotSet:
        pairs, labels = self.pairs(n)
        prompts = self.texts(np.repeat(self.centres, TEMPLATES, axis=0))  # class-major
        return TokenZeroShotSet(pairs.image, labels, prompts, TEMPLATES)


def planted_data(n_train=400, n_val=100, n_test=120, seed=0) -> TokenTrialData:
    world = World(seed)
    train, _ = world.pairs(n_train)
    val, _ = world.pairs(n_val)
    test, _ = world.pairs(n_test, captions=2)
    return TokenTrialData(train, val, zero_shot={"planted": world.zero_shot(n_test)},
                          retrieval={"planted": test})


def pooled(tokens: RaggedTokens, use_cls: bool) -> np.ndarray:
    """Pooled features of a resident source: the CLS token, or the mean of the local tokens."""
    if use_cls:
        return tokens.prefix[:, 0]
    return np.add.reduceat(tokens.local, tokens.offsets[:-1], axis=0) / tokens.lengths()[:, None]
