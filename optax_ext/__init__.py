"""optax-ext: Su Jianlin's optimizers and training tricks as chainable optax transforms.

Everything public is importable from the top level::

    import optax_ext as ox
    tx = ox.tiger(learning_rate=1e-3)
"""

from optax_ext._common import (
    EMBEDDING,
    NORM_AND_BIAS,
    NORM_SCALE,
    path_labels,
    path_mask,
    path_multipliers,
    tree_bytes,
    tree_paths,
)
from optax_ext.optimizers.tiger import TIGER_SCALE_RULES, TigerState, scale_by_tiger, tiger

__version__ = "0.1.0"

__all__ = [
    "EMBEDDING",
    "NORM_AND_BIAS",
    "NORM_SCALE",
    "TIGER_SCALE_RULES",
    "TigerState",
    "path_labels",
    "path_mask",
    "path_multipliers",
    "scale_by_tiger",
    "tiger",
    "tree_bytes",
    "tree_paths",
]
