"""scaling: learning rate and weight decay when the batch size changes.

From theory (Su Jianlin's kexue.fm posts, McCandlish et al.'s gradient noise scale) and
from gradient-noise measurements taken during training.
"""

__all__: list[str] = []
