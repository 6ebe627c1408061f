import sys
from pathlib import Path

# Let tests import shared case tables and helpers that live beside them.
sys.path.insert(0, str(Path(__file__).resolve().parent))
