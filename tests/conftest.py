import sys
from pathlib import Path

# Let tests import shared case tables and helpers that live beside them.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Hypothesis profiles: "ci" (the default) draws the same cases on every run, so a CI failure
# reproduces; TORCHADJOINT_HYPOTHESIS_PROFILE=large draws many more, with fresh randomness.
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "large", max_examples=1000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("TORCHADJOINT_HYPOTHESIS_PROFILE", "ci"))
