"""Checkpoints written so that a crash never leaves a corrupt one.

``save_atomic`` writes to a temporary file in the destination's folder, flushes and
fsyncs it, then renames it over the destination (``os.replace`` is atomic on POSIX and
Windows): a reader sees either the old file or the new one, never a partial one. Before
the rename, the previous good checkpoint is kept as ``checkpoint.prev.pt`` (a hard link,
or a copy where links are not supported), so a checkpoint damaged later (disk, an
interrupted copy) still leaves one to resume from.

Every file is written with the permissions the umask gives (as ``open`` would), not the
0600 of a temporary file, and holds tensors and plain Python data only (numbers, strings,
lists, tuples, dicts): it loads with ``torch.load(weights_only=True)``, and
:func:`safe_load` loads it no other way, so a ``checkpoint.pt`` or ``model.pt`` from
elsewhere cannot run code when read. Files of version 1 (numpy arrays in the random
states) are read through an allow-list of numpy's array-rebuilding functions only.
"""
from __future__ import annotations

import io
import os
import random
import shlex
import shutil
import tempfile
from typing import Any, Callable, Dict, List

import torch

from .errors import TrainingError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FINAL_MODEL = "model.pt"
FORMAT = "torchadjoint-train-checkpoint"
# 2: random states as plain lists (version 1 held numpy arrays); read: both.
VERSION = 2
READABLE_VERSIONS = (1, 2)
MODEL_FORMAT = "torchadjoint-model"
# What every readable checkpoint holds (versions 1 and 2 alike; "resumes" is optional).
REQUIRED = {"epoch": int, "config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "rng": dict,
            "history": list, "iterations": list}


def _fsync_folder(folder: str) -> None:
    # The rename itself is durable only once the folder entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(fd: int) -> None:
    """Give a temporary file (mkstemp: 0600) the permissions ``open`` would have given."""
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except (OSError, AttributeError):  # pragma: no cover - e.g. Windows
        pass


def save_atomic(obj: Any, path: str, keep_previous: str = "") -> None:
    """``torch.save(obj)`` to ``path`` atomically; the old ``path`` becomes ``keep_previous``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise first: a failure here touches no file
    _replace_atomically(path, lambda fh: fh.write(buffer.getbuffer()), "wb", ".pt", keep_previous)
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(text: str, path: str) -> None:
    """Replace the text file ``path`` atomically (metrics tables are rewritten every epoch)."""
    _replace_atomically(path, lambda fh: fh.write(text), "w", ".txt")


def _replace_atomically(path: str, write: Callable[[Any], Any], mode: str, suffix: str, keep_previous: str = "") -> None:
    """``write(fh)`` into a temporary file beside ``path`` (opened with ``mode``), on disk
    (fsync) before it is renamed over ``path``: a reader, or a crash, sees the old file or
    the new one, never a part. The old ``path`` becomes ``keep_previous`` (in the same
    folder) first, when given. On any failure the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        _publish(fd)
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and os.path.exists(path):
            _keep_copy(path, os.path.join(folder, keep_previous))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _keep_copy(path: str, previous: str) -> None:
    """Make ``previous`` the current ``path`` without ever removing ``path`` meanwhile."""
    folder = os.path.dirname(previous)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-prev-", suffix=".pt", dir=folder)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


def rng_states() -> Dict[str, Any]:
    """Every global random state a run touches (python, numpy, torch CPU and CUDA), as
    tensors and plain lists (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    states: Dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    try:
        import numpy as np

        numpy_state = np.random.get_state(legacy=False)
        states["numpy"] = {
            "bit_generator": numpy_state["bit_generator"], "key": numpy_state["state"]["key"].tolist(),
            "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        }
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    """Undo :func:`rng_states` (also reads version-1 files: numpy's legacy tuple)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np

        saved = states["numpy"]
        if isinstance(saved, dict):
            saved = {"bit_generator": saved["bit_generator"],
                     "state": {"key": np.asarray(saved["key"], dtype=np.uint32), "pos": saved["pos"]},
                     "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]}
        np.random.set_state(saved)
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class UnsafeFileError(Exception):
    """A file holds Python objects that loading would have to construct (code could run)."""


def _legacy_numpy_globals(names: List[str]):
    """The numpy objects a version-1 checkpoint's random state needs, if ``names`` are
    exactly those (numpy arrays of plain numbers: rebuilding them runs no code of the
    file); otherwise None."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray,
               "numpy._core.multiarray._reconstruct": multiarray._reconstruct,
               "numpy.core.multiarray._reconstruct": multiarray._reconstruct}
    found = []
    for name in names:
        if name not in allowed:
            return None
        found.append((allowed[name], name))
    # Rebuilding a numpy dtype also names its class (e.g. numpy.dtypes.UInt32DType), which
    # the scan above does not list: the plain numeric ones are allowed.
    numeric = ("Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float16",
               "Float32", "Float64", "Long", "ULong", "LongLong", "ULongLong")
    found += [getattr(np.dtypes, f"{k}DType") for k in numeric if hasattr(getattr(np, "dtypes", None), f"{k}DType")]
    return found


def safe_load(path: str, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only.

    A file that needs anything else is refused with :class:`UnsafeFileError` naming what
    it holds (except version-1 training checkpoints, whose numpy random states are read
    through an allow-list). A damaged file raises what ``torch.load`` raises."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip archive at all: damaged, or not a torch file
            raise exc from None
        if not names:
            raise
        legacy = _legacy_numpy_globals(names)
        if legacy is not None:
            with torch.serialization.safe_globals(legacy):
                return torch.load(path, map_location=map_location, weights_only=True)
        raise UnsafeFileError(
            f"{path} holds Python objects besides tensors and plain data ({', '.join(sorted(names))}); loading it would "
            f"run code stored in the file, so it is refused (torch.load(weights_only=True)). Files written by "
            f"torchadjoint hold no such objects: this one was made elsewhere or altered. If you trust its source, "
            f"load it yourself with torch.load(path, weights_only=False) and save the parts you need again"
        ) from None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a training checkpoint (safely, see :func:`safe_load`); a missing, truncated,
    unsafe or foreign file is a :class:`TrainingError` that says which file and what to do."""
    if os.path.isdir(path):
        raise TrainingError(f"--resume {path!r} is a folder, not a checkpoint file; give the run's folder as --out "
                            f"and --resume alone (or --resume FOLDER/{CHECKPOINT})")
    if not os.path.isfile(path):
        raise TrainingError(f"no checkpoint to resume from: {path} does not exist; train without --resume first")
    try:
        state = safe_load(path)
    except UnsafeFileError as exc:
        raise TrainingError(f"refusing checkpoint: {exc}") from None
    except Exception as exc:  # torch raises several types for damaged files
        hint = ""
        previous = os.path.join(os.path.dirname(path), PREVIOUS)
        if os.path.abspath(path) != os.path.abspath(previous) and os.path.isfile(previous):
            hint = f"; the previous checkpoint is kept: resume from it with --resume {shlex.quote(previous)}"
        raise TrainingError(f"cannot read checkpoint {path} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}){hint}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a torchadjoint training checkpoint")
    if state.get("version") not in READABLE_VERSIONS:
        raise TrainingError(f"{path} has checkpoint version {state.get('version')!r}; this program reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
    # An altered or truncated-by-hand file: say so, rather than fail later inside the loop.
    wrong = [key for key, kind in REQUIRED.items() if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)]
    if wrong:
        raise TrainingError(f"{path} is a damaged torchadjoint checkpoint: {', '.join(wrong)} missing or of the wrong "
                            f"type; resume from another checkpoint (e.g. --resume {shlex.quote(os.path.join(os.path.dirname(path), PREVIOUS))})")
    return state
