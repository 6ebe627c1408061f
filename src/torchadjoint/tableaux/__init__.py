"""The Runge–Kutta methods, one tableau per file, and the name → tableau registry."""
from .adams import EXPLICIT_ADAMS, FIXED_ADAMS, IMPLICIT_ADAMS, AdamsTableau
from .adaptive_heun import ADAPTIVE_HEUN
from .base import ButcherTableau
from .bosh3 import BOSH3
from .dopri5 import DOPRI5
from .dopri8 import DOPRI8
from .esdirk import ESDIRKTableau
from .euler import EULER
from .fehlberg2 import FEHLBERG2
from .heun2 import HEUN2
from .heun3 import HEUN3
from .kvaerno3 import KVAERNO3
from .kvaerno5 import KVAERNO5
from .midpoint import MIDPOINT
from .rk4 import RK4
from .tsit5 import TSIT5

METHODS = {
    t.name: t
    for t in (EULER, MIDPOINT, HEUN2, HEUN3, RK4, ADAPTIVE_HEUN, FEHLBERG2, BOSH3, DOPRI5, TSIT5, DOPRI8, KVAERNO3, KVAERNO5,
              EXPLICIT_ADAMS, IMPLICIT_ADAMS, FIXED_ADAMS)
}
FIXED_STEP_METHODS = tuple(name for name, t in METHODS.items() if not t.adaptive)
ADAPTIVE_METHODS = tuple(name for name, t in METHODS.items() if t.adaptive)
# L-stable implicit methods for stiff problems (Newton solves: torchadjoint.implicit).
IMPLICIT_METHODS = tuple(name for name, t in METHODS.items() if getattr(t, "implicit", False))

__all__ = ["ButcherTableau", "ESDIRKTableau", "AdamsTableau", "METHODS", "IMPLICIT_METHODS", "FIXED_STEP_METHODS", "ADAPTIVE_METHODS"]
