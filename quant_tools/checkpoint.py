"""Reading Hugging Face checkpoints and writing output directories atomically.

Readers never modify their input: safetensors files are opened read-only and tensors are copied
out. Writers build the whole output in a temporary sibling directory and rename it into place
only when everything is written, so an interrupted run leaves no half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_bipolar.format.safetensors_header import SafetensorsHeaderError, read_safetensors_header

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Files copied verbatim from SRC to DST (tokenizer, generation and chat-template files).
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.json",
    "chat_template.jinja",
)
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """The source checkpoint cannot be read, or the destination cannot be written."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """safetensors reports a corrupt file with its own exception type and no file name: add both."""
    try:
        yield
    except (OSError, CheckpointError):
        raise
    except Exception as e:  # safetensors_rust.SafetensorError and friends
        raise CheckpointError(f"{path}: cannot read this safetensors file ({type(e).__name__}: {e}); "
                              "re-download or re-save it") from e


def _check_finite(name: str, t: torch.Tensor, path: Path) -> torch.Tensor:
    """A NaN/inf anywhere (quantized or copied) would make every output of the model NaN: refuse it."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = ~torch.isfinite(t)
        first = [int(i) for i in bad.nonzero()[0]]
        raise CheckpointError(f"{name}: weight has {int(bad.sum())} NaN/inf value(s) (first at index {first}) in "
                              f"{path}; fix the source checkpoint (re-save it from a good copy) before converting")
    return t


def _os_error(e: Exception, path: Path) -> OSError:
    """An OSError (errno, message, file) for an I/O error that safetensors reported as text."""
    m = re.search(r"os error (\d+)", str(e))
    code = int(m.group(1)) if m else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def _check_safetensors_file(path: Path) -> None:
    """Fail with a clear message on a truncated or corrupt safetensors file (before reading it)."""
    try:
        read_safetensors_header(path)
    except SafetensorsHeaderError as e:
        raise CheckpointError(f"{e}; re-download or re-save it") from e


class HFCheckpoint:
    """A Hugging Face checkpoint directory: config.json plus single or sharded safetensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory; pass a Hugging Face checkpoint directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path}: no config.json; not a Hugging Face checkpoint directory")
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: invalid JSON ({e})") from e
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index ({e})") from e
            missing = sorted({f for f in wm.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names shard file(s) that do not exist: {missing}")
            for f in sorted(set(wm.values())):
                _check_safetensors_file(self.path / f)
            return dict(wm)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {bins}: re-save with safe_serialization=True)" if bins else ""
            raise CheckpointError(f"{self.path}: no *.safetensors weights{hint}")
        wm = {}
        for f in files:
            _check_safetensors_file(f)
            with _reading(f), safe_open(f, framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                    wm[name] = f.name
        return wm

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        f = self.path / self.weight_map[name]
        with _reading(f), safe_open(f, framework="pt") as sf:
            t = sf.get_tensor(name)
        return _check_finite(name, t, f).clone()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order, one shard open at a time."""
        by_file: dict[str, list[str]] = {}
        for name, f in self.weight_map.items():
            by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            with _reading(self.path / f), safe_open(self.path / f, framework="pt") as sf:
                for name in names:
                    yield name, _check_finite(name, sf.get_tensor(name), self.path / f)

    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.weight_map.values()))


class ShardedWriter:
    """Writes tensors into model-0000i-of-0000n.safetensors shards plus the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        idx = len(self.shards)
        path = self.out_dir / f"shard-{idx:05d}.safetensors"
        try:
            save_file(self.pending, str(path), metadata={"format": "pt"})
        except OSError:
            raise
        except Exception as e:  # safetensors reports a full disk as SafetensorError
            raise _os_error(e, path) from e
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{i:05d}.safetensors", self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp_dirs(parent: Path, name: str) -> None:
    """Remove temporary directories left by killed runs for the same destination.

    A run killed between moving the old DST aside (``--overwrite``) and moving the new one into
    place leaves no DST and the old one as ``.tmp-<name>-<pid>-old``: that one is put back.
    """
    for p in sorted(parent.glob(f"{TMP_PREFIX}{name}-*-old")):
        pid = p.name[len(TMP_PREFIX) + len(name) + 1:].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and not (parent / name).exists():
            os.replace(p, parent / name)
    for p in parent.glob(f"{TMP_PREFIX}{name}-*"):
        pid = p.name[len(TMP_PREFIX) + len(name) + 1:].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories themselves to disk before the rename:
    otherwise a power loss soon after could leave a renamed DST with empty or partial files."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM during the final renames (a few microseconds): an interrupt between
    moving the old DST aside and moving the new one in would otherwise leave no DST at all. The
    output is complete by then, so a signal that arrived meanwhile is only reported."""
    got: list[int] = []
    try:
        old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum))
               for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals go elsewhere anyway
        yield got
        return
    try:
        yield got
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst``; on success rename it to ``dst``.

    ``dst`` is refused if it exists unless ``overwrite``; then the old directory is replaced only
    after the new one is complete. On any error (or KeyboardInterrupt) the temporary directory is
    removed and ``dst`` is left as it was.
    """
    dst = Path(dst).absolute()
    parent = dst.parent
    with contextlib.suppress(OSError):
        if parent.is_dir():  # first: a DST moved aside by a killed --overwrite run is restored
            _remove_stale_tmp_dirs(parent, dst.name)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; choose another destination or pass --overwrite")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dst.name}-{os.getpid()}-", dir=parent))
        tmp.chmod(0o755)
    except OSError as e:
        raise CheckpointError(f"cannot create the output next to {dst}: {e.strerror or e}") from e
    try:
        yield tmp
        _fsync_tree(tmp)
        with _signals_deferred() as got:
            if dst.exists():
                old = parent / f"{TMP_PREFIX}{dst.name}-{os.getpid()}-old"
                os.replace(dst, old)
                try:
                    os.replace(tmp, dst)
                except BaseException:
                    os.replace(old, dst)  # put the previous DST back
                    raise
                _fsync_dir(parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dst)
                _fsync_dir(parent)
        if got:
            print(f"signal {got[0]} arrived while {dst} was being moved into place; the output is complete",
                  file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
