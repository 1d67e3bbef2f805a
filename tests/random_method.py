"""A whole pruning method in one file, as a user would add one: random pruning.

Its score is uniform noise seeded from the weight's own bytes, so the same checkpoint always
gives the same mask (export and load-time pruning agree bit for bit) with no state anywhere.
Registering it is all it takes: export, pruning at load time, N:M and global scope come from
the contract in ``llm_prune.methods``.
"""

import hashlib

import torch

from llm_prune.methods import Method, register


def random_score(weight: torch.Tensor) -> torch.Tensor:
    data = weight.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    # An explicit dtype: the loader scores in its reading thread while transformers builds the
    # model, which changes torch's (process-wide) default dtype for a while.
    return torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


RANDOM = register(Method("random", "random pruning (a baseline): every weight equally likely to go",
                         score=random_score))
