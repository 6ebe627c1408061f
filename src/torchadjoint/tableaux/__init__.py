"""The Runge–Kutta methods, one tableau per file, and the name → tableau registry."""
from .adaptive_heun import ADAPTIVE_HEUN
from .base import ButcherTableau
from .bosh3 import BOSH3
from .dopri5 import DOPRI5
from .dopri8 import DOPRI8
from .euler import EULER
from .fehlberg2 import FEHLBERG2
from .heun2 import HEUN2
from .heun3 import HEUN3
from .midpoint import MIDPOINT
from .rk4 import RK4
from .tsit5 import TSIT5

METHODS = {
    t.name: t
    for t in (EULER, MIDPOINT, HEUN2, HEUN3, RK4, ADAPTIVE_HEUN, FEHLBERG2, BOSH3, DOPRI5, TSIT5, DOPRI8)
}
FIXED_STEP_METHODS = tuple(name for name, t in METHODS.items() if not t.adaptive)
ADAPTIVE_METHODS = tuple(name for name, t in METHODS.items() if t.adaptive)

__all__ = ["ButcherTableau", "METHODS", "FIXED_STEP_METHODS", "ADAPTIVE_METHODS"]
