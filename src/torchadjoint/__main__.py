"""``python -m torchadjoint ...`` (also what ``torchrun -m torchadjoint ...`` runs)."""
import sys

from .cli import main

sys.exit(main())
