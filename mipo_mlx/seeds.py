"""Seeds derived from the recipe's seed and a purpose, so that each random choice is reproducible alone.

    derived_seed(recipe.seed, "chunk", 3)     # the sampler seed of generation chunk 3
    derived_seed(recipe.seed, "eval", "p-1")  # whether prompt p-1 is held out

No MLX here: the run directory's held-out split uses it too.
"""

import hashlib


def derived_seed(*parts) -> int:
    """A 31-bit seed from any values, stable across runs and machines."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
