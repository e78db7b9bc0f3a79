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
from optax_ext.optimizers.adax import (
    ScaleByAdaxState,
    adax,
    adaxw,
    scale_by_adax,
)
from optax_ext.optimizers.amos import (
    ScaleByAmosState,
    amos,
    amos_default_eta,
    amos_default_shape,
    scale_by_amos,
)
from optax_ext.optimizers.tiger import (
    TIGER_SCALE_RULES,
    TigerState,
    scale_by_tiger,
    tiger,
)
from optax_ext.schedules import (
    DecaySchedules,
    amos_lr_schedule,
    amos_weight_decay_schedule,
    constant_decay_lr_schedule,
    coupled_decay_schedules,
    piecewise_linear,
)

__version__ = "0.1.0"

__all__ = [
    "DecaySchedules",
    "EMBEDDING",
    "NORM_AND_BIAS",
    "NORM_SCALE",
    "ScaleByAdaxState",
    "ScaleByAmosState",
    "TIGER_SCALE_RULES",
    "TigerState",
    "adax",
    "adaxw",
    "amos",
    "amos_default_eta",
    "amos_default_shape",
    "amos_lr_schedule",
    "amos_weight_decay_schedule",
    "constant_decay_lr_schedule",
    "coupled_decay_schedules",
    "path_labels",
    "path_mask",
    "path_multipliers",
    "piecewise_linear",
    "scale_by_adax",
    "scale_by_amos",
    "scale_by_tiger",
    "tiger",
    "tree_bytes",
    "tree_paths",
]
