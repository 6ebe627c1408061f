"""Forward Euler: order 1, fixed step."""
from .base import ButcherTableau

EULER = ButcherTableau(name="euler", order=1, c=(0.0,), a=((),), b=(1.0,))
