"""Move converted checkpoints to the GPU machine in parts: a content-addressed, deduplicated bundle.

    python benchmarks/device_bundle.py pack OUT_DIR [--part-mb 50] NAME=MODEL_DIR [NAME=MODEL_DIR ...]
    python benchmarks/device_bundle.py stash [--bundle-dir .devbundle] [--stash /tmp/bipolar-bundle-stash]
    python benchmarks/device_bundle.py unpack DEST_ROOT --parts N [--bundle-dir .devbundle] [--stash DIR]
        [--overwrite] [--keep-stash]

Why: the GPU machine receives the repository's working tree on every call plus at most 64 MiB of
ignored files named in ``carry``, and only its /tmp survives between back-to-back calls. Converted
checkpoints are ignored (.models/) and larger than that, and mostly the same bytes: the bf16
embedding, norms and tokenizer of SmolLM2 are identical in every conversion of it.

``pack`` (here) reads every file of every MODEL_DIR. Each tensor of each safetensors file (one file
or shards) is stored once under the hash of (dtype, shape, bytes), every other file (config.json,
tokenizer files, shard index, generation_config.json, chat template, ...) once under the hash of its
bytes, so the shared embedding is stored once and so are weight codes that two checkpoints share.
The bundle is one tar stream (``manifest.json``, then ``blobs/<sha256>``) cut into
``OUT_DIR/bundle.part-00``, ``-01``, ... of at most ``--part-mb`` MiB each, plus a small
``OUT_DIR/bundle.index.json`` (bundle id, size and sha256 of every part). It prints the number of
parts and what to carry in each call. Files whose name starts with a dot are left out.

``stash`` (on the GPU machine, every call) copies the parts that this call carried into
``/tmp/bipolar-bundle-stash`` (checking each against the index when one is there) and says which
parts are still missing. Carry ``bundle.index.json`` with every part: stash then refuses a part
damaged in transit right away, and drops the parts of an older bundle when a new one arrives.

``unpack`` (on the GPU machine, once all N parts are stashed; it stashes the current call's parts
first) checks the parts (all present, sizes and sha256 against the index), reassembles the stream,
checks the hash of every tensor and file, and writes each model as ``DEST_ROOT/NAME/`` exactly as
it was packed (the same safetensors file or shards + index, byte for byte, and its small files).
A model already unpacked from the same bundle is kept; another existing directory is refused
unless ``--overwrite``. Each model is written to a temporary directory and renamed into place.
Exit status: 0 done, 1 missing or damaged parts (the message names them and what to carry), 2 bad
arguments. Standard library only: it runs with any python3 >= 3.8.

Conventional folder: ``.devbundle/`` at the repository root, kept out of git by a line
``/.devbundle/`` in ``.git/info/exclude`` (``echo /.devbundle/ >> .git/info/exclude``). Example:

    python benchmarks/device_bundle.py pack .devbundle --part-mb 50 w4a16=.models/acc/w4-gptq ...
    # GPU machine, call k = 0 .. N-1, carry [".devbundle/bundle.part-0k", ".devbundle/bundle.index.json"]:
    python3 benchmarks/device_bundle.py stash
    # last call (may carry the last part itself):
    python3 benchmarks/device_bundle.py unpack /tmp/bipolar-models --parts N
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tarfile
import time
from pathlib import Path

FORMAT = "bipolar-device-bundle"
VERSION = 1
PART_PREFIX = "bundle.part-"
INDEX_NAME = "bundle.index.json"
MANIFEST_NAME = "manifest.json"
MARKER_NAME = ".device-bundle"  # in an unpacked model directory: which bundle it came from
DEFAULT_STASH = "/tmp/bipolar-bundle-stash"
DEFAULT_BUNDLE_DIR = ".devbundle"
MIB = 1 << 20
CHUNK = 8 * MIB


class BundleError(Exception):
    """A missing or damaged part, or a bundle that does not check out: exit status 1."""


class UsageError(Exception):
    """Bad arguments: exit status 2."""


def part_name(i: int) -> str:
    return f"{PART_PREFIX}{i:02d}"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


# ---- hashing --------------------------------------------------------------------------------------
def tensor_hasher(dtype: str, shape: list[int]):
    """sha256 keyed on (dtype, shape, bytes): equal bytes of another dtype or shape are another blob."""
    h = hashlib.sha256()
    h.update(b"tensor\0" + dtype.encode() + b"\0" + json.dumps(list(shape)).encode() + b"\0")
    return h


def raw_hasher():
    h = hashlib.sha256()
    h.update(b"raw\0")
    return h


def blob_hasher(info: dict):
    return tensor_hasher(info["dtype"], info["shape"]) if info["kind"] == "tensor" else raw_hasher()


def read_range(path: Path, offset: int, length: int):
    """Yield the bytes of path[offset:offset+length] in chunks."""
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            b = f.read(min(CHUNK, left))
            if not b:
                raise OSError(f"{path}: file ended {left} bytes early (changed while packing?)")
            left -= len(b)
            yield b


def hash_range(h, path: Path, offset: int, length: int) -> str:
    for b in read_range(path, offset, length):
        h.update(b)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return hash_range(hashlib.sha256(), path, 0, path.stat().st_size)


# ---- pack -----------------------------------------------------------------------------------------
def safetensors_layout(path: Path) -> tuple[int, list[tuple[int, int, str | None, list | None]]] | None:
    """(header bytes incl. the 8-byte length, [(begin, end, dtype, shape) covering the data region in
    order]); gaps become (begin, end, None, None) raw segments. None when the file is not a
    safetensors file this tool understands (then it travels as one raw blob)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * MIB):
            return None
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return None
    if not isinstance(header, dict):
        return None
    start = 8 + n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = (int(x) for x in info["data_offsets"])
            dtype, shape = str(info["dtype"]), [int(x) for x in info["shape"]]
        except (KeyError, TypeError, ValueError):
            return None
        if not 0 <= b <= e <= size - start:
            return None
        spans.append((b, e, dtype, shape))
    spans.sort(key=lambda s: (s[0], s[1]))
    segments, pos = [], 0
    for b, e, dtype, shape in spans:
        if b < pos:  # overlapping tensors: not a layout to take apart
            return None
        if b > pos:
            segments.append((start + pos, start + b, None, None))
        segments.append((start + b, start + e, dtype, shape))
        pos = e
    if start + pos < size:
        segments.append((start + pos, size, None, None))
    return start, segments


def scan_models(models: list[tuple[str, Path]]):
    """Hash everything. Returns (manifest, sources: blob -> (path, offset, length), stats per model)."""
    blobs: dict[str, dict] = {}
    sources: dict[str, tuple[Path, int, int]] = {}
    manifest_models: dict[str, dict] = {}
    stats = []

    def add_blob(key: str, info: dict, src: tuple[Path, int, int]) -> bool:
        if key in blobs:
            return False
        blobs[key] = info
        sources[key] = src
        return True

    for name, root in models:
        files, total, new = [], 0, 0
        n_tensors = 0
        paths = sorted(p for p in root.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not paths:
            raise UsageError(f"{root}: no files to pack")
        for path in paths:
            rel = path.relative_to(root).as_posix()
            size = path.stat().st_size
            total += size
            entry = {"path": rel, "bytes": size, "sha256": file_sha256(path)}
            layout = safetensors_layout(path) if path.suffix == ".safetensors" else None
            if layout is None:
                key = hash_range(raw_hasher(), path, 0, size)
                if add_blob(key, {"kind": "raw", "bytes": size}, (path, 0, size)):
                    new += size
                entry["blob"] = key
            else:
                header_len, segments = layout
                key = hash_range(raw_hasher(), path, 0, header_len)
                if add_blob(key, {"kind": "raw", "bytes": header_len}, (path, 0, header_len)):
                    new += header_len
                seg_keys = [key]
                for b, e, dtype, shape in segments:
                    if dtype is None:
                        info, h = {"kind": "raw", "bytes": e - b}, raw_hasher()
                    else:
                        info, h = {"kind": "tensor", "bytes": e - b, "dtype": dtype, "shape": shape}, \
                            tensor_hasher(dtype, shape)
                        n_tensors += 1
                    key = hash_range(h, path, b, e - b)
                    if add_blob(key, info, (path, b, e - b)):
                        new += e - b
                    seg_keys.append(key)
                entry["segments"] = seg_keys  # header blob, then the data region in file order
            files.append(entry)
        manifest_models[name] = {"source": str(root), "files": files}
        stats.append({"name": name, "dir": str(root), "files": len(files), "tensors": n_tensors, "bytes": total,
                      "new_bytes": new})
    manifest = {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "blobs": blobs, "models": manifest_models}
    return manifest, sources, stats


class SplitWriter(io.RawIOBase):
    """A write-only stream cut into OUT_DIR/bundle.part-NN files of at most ``part_bytes`` each."""

    def __init__(self, out_dir: Path, part_bytes: int):
        super().__init__()
        self.out_dir, self.part_bytes = out_dir, part_bytes
        self.parts: list[dict] = []
        self._f = None
        self._h = None
        self._n = 0

    def writable(self) -> bool:
        return True

    def _close_part(self) -> None:
        if self._f is not None:
            self._f.close()
            self.parts[-1].update(bytes=self._n, sha256=self._h.hexdigest())
            self._f = None

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            if self._f is None or self._n >= self.part_bytes:
                self._close_part()
                name = part_name(len(self.parts))
                self.parts.append({"file": name})
                self._f = open(self.out_dir / name, "wb")  # noqa: SIM115 - closed in _close_part
                self._h, self._n = hashlib.sha256(), 0
            take = min(len(mv) - done, self.part_bytes - self._n)
            chunk = mv[done:done + take]
            self._f.write(chunk)
            self._h.update(chunk)
            self._n += take
            done += take
        return done

    def close(self) -> None:
        self._close_part()
        super().close()


class RangeReader(io.RawIOBase):
    """path[offset:offset+length] as a readable stream (what tarfile.addfile copies from)."""

    def __init__(self, path: Path, offset: int, length: int):
        super().__init__()
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._f.seek(offset)
        self._left = length

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        b = self._f.read(n)
        self._left -= len(b)
        return b

    def close(self) -> None:
        self._f.close()
        super().close()


def pack(out_dir: Path, part_mb: float, models: list[tuple[str, Path]]) -> dict:
    if part_mb <= 0:
        raise UsageError("--part-mb must be positive")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise UsageError(f"model names must be unique, got {names}")
    for name, root in models:
        if not name or "/" in name or name.startswith("."):
            raise UsageError(f"bad model name {name!r}: a plain directory name is needed")
        if not root.is_dir():
            raise UsageError(f"{root}: not a directory (for {name})")
    t0 = time.time()
    manifest, sources, stats = scan_models(models)
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    bundle_id = hashlib.sha256(manifest_bytes).hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob(PART_PREFIX + "*")) + [out_dir / INDEX_NAME]:
        if old.is_file():
            old.unlink()  # an older bundle's parts would otherwise be taken for this one's
    writer = SplitWriter(out_dir, int(part_mb * MIB))
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(MANIFEST_NAME)
        ti.size, ti.mtime = len(manifest_bytes), int(time.time())
        tf.addfile(ti, io.BytesIO(manifest_bytes))
        for key, (path, offset, length) in sources.items():
            ti = tarfile.TarInfo(f"blobs/{key}")
            ti.size, ti.mtime = length, 0
            reader = RangeReader(path, offset, length)
            try:
                tf.addfile(ti, reader)
            finally:
                reader.close()
    writer.close()
    index = {"format": FORMAT, "version": VERSION, "bundle_id": bundle_id, "parts": writer.parts,
             "total_bytes": sum(p["bytes"] for p in writer.parts), "part_mib": part_mb,
             "models": {s["name"]: {"dir": s["dir"], "bytes": s["bytes"]} for s in stats},
             "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1))
    source_total = sum(s["bytes"] for s in stats)
    print(f"{'model':<12} {'files':>5} {'tensors':>7} {'bytes':>11} {'new in bundle':>13}  source")
    for s in stats:
        print(f"{s['name']:<12} {s['files']:>5} {s['tensors']:>7} {human(s['bytes']):>11} "
              f"{human(s['new_bytes']):>13}  {s['dir']}")
    print(f"sources {human(source_total)} -> bundle {human(index['total_bytes'])} "
          f"({len(manifest['blobs'])} unique blobs, {source_total / max(index['total_bytes'], 1):.2f}x smaller); "
          f"{time.time() - t0:.1f} s; bundle id {bundle_id}")
    for p in writer.parts:
        print(f"  {out_dir / p['file']}  {p['bytes']:>10} bytes ({human(p['bytes'])})  sha256 {p['sha256'][:16]}")
    n = len(writer.parts)
    rel = out_dir.as_posix().rstrip("/")
    print(f"carry one part per call with the index, e.g. [\"{rel}/{part_name(0)}\", \"{rel}/{INDEX_NAME}\"], "
          "and run `python3 benchmarks/device_bundle.py stash`; once all are stashed: "
          f"`python3 benchmarks/device_bundle.py unpack DEST_ROOT --parts {n}`")
    print(f"parts: {n}")
    return index


# ---- stash ----------------------------------------------------------------------------------------
def read_index(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is damaged ({e}); carry it again") from e
    if index.get("format") != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} index")
    return index


def part_problem(path: Path, expected: dict) -> str | None:
    """Why the part file does not match the index entry, or None when it does."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{size} bytes, the index says {expected['bytes']} (truncated or from another bundle)"
    digest = file_sha256(path)
    if digest != expected["sha256"]:
        return f"sha256 {digest[:16]}..., the index says {expected['sha256'][:16]}... (damaged)"
    return None


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def stash(bundle_dir: Path, stash_dir: Path, quiet: bool = False) -> dict | None:
    """Copy the parts (and index) present in bundle_dir into stash_dir; returns the index in force."""
    stash_dir.mkdir(parents=True, exist_ok=True)
    carried = read_index(bundle_dir / INDEX_NAME)
    stashed = read_index(stash_dir / INDEX_NAME)
    if carried and stashed and carried["bundle_id"] != stashed["bundle_id"]:
        old = sorted(stash_dir.glob(PART_PREFIX + "*"))
        for p in old:
            p.unlink()
        print(f"stash: new bundle {carried['bundle_id']} replaces {stashed['bundle_id']} "
              f"({len(old)} old part(s) removed)")
        stashed = None
    if carried and (bundle_dir / INDEX_NAME).resolve() != (stash_dir / INDEX_NAME).resolve():
        copy_atomic(bundle_dir / INDEX_NAME, stash_dir / INDEX_NAME)
    index = carried or stashed
    expected = {p["file"]: p for p in index["parts"]} if index else {}
    problems = []
    here = sorted(bundle_dir.glob(PART_PREFIX + "[0-9]*")) if bundle_dir.is_dir() else []
    for src in here:
        dst = stash_dir / src.name
        if src.resolve() == dst.resolve():
            continue
        if index:
            if src.name not in expected:
                problems.append(f"{src}: not a part of bundle {index['bundle_id']} "
                                f"({len(index['parts'])} parts); left out")
                continue
            why = part_problem(src, expected[src.name])
            if why:
                problems.append(f"{src}: {why}; not stashed, carry it again")
                continue
        copy_atomic(src, dst)
        if not quiet:
            print(f"stash: {src.name} ({human(src.stat().st_size)}) -> {dst}")
    if not index:
        print(f"stash: no {INDEX_NAME} carried or stashed: parts are checked only at unpack "
              "(carry the index with the parts)")
    if index:
        have = [p["file"] for p in index["parts"] if (stash_dir / p["file"]).is_file()]
        missing = [p["file"] for p in index["parts"] if p["file"] not in have]
        print(f"stash: bundle {index['bundle_id']}: {len(have)} of {len(index['parts'])} parts in {stash_dir}"
              + (f"; missing {', '.join(missing)}" if missing else "; complete"))
    else:
        print(f"stash: {len(list(stash_dir.glob(PART_PREFIX + '*')))} part(s) in {stash_dir}")
    if problems:
        raise BundleError("\n".join(problems))
    return index


# ---- unpack ---------------------------------------------------------------------------------------
class ConcatReader(io.RawIOBase):
    """The parts, read back to back as one stream; knows which part a byte position is in."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self.paths = paths
        self.sizes = [p.stat().st_size for p in paths]
        self.pos = 0
        self._i = 0
        self._f = open(paths[0], "rb") if paths else None  # noqa: SIM115 - closed in close()

    def readable(self) -> bool:
        return True

    def parts_between(self, begin: int, end: int) -> str:
        """The part file(s) holding stream bytes [begin, end)."""
        names, acc = [], 0
        for p, s in zip(self.paths, self.sizes):
            if acc < max(end, begin + 1) and begin < acc + s:
                names.append(p.name)
            acc += s
        return " and ".join(names) if names else (self.paths[-1].name if self.paths else "?")

    def readinto(self, buf) -> int:
        while self._f is not None:
            n = self._f.readinto(buf)
            if n:
                self.pos += n
                return n
            self._f.close()
            self._i += 1
            self._f = open(self.paths[self._i], "rb") if self._i < len(self.paths) else None  # noqa: SIM115
        return 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        super().close()


def locate_parts(stash_dir: Path, n_parts: int, index: dict | None) -> list[Path]:
    if index is not None:
        if len(index["parts"]) != n_parts:
            raise BundleError(f"--parts {n_parts}, but bundle {index['bundle_id']} has {len(index['parts'])} parts "
                              f"(see {stash_dir / INDEX_NAME})")
        bad = []
        for p in index["parts"]:
            why = part_problem(stash_dir / p["file"], p)
            if why:
                bad.append(f"  {p['file']}: {why}")
        if bad:
            raise BundleError(f"bundle {index['bundle_id']} in {stash_dir} is not complete and intact "
                              f"({n_parts} parts):\n" + "\n".join(bad)
                              + "\ncarry those parts (with the index) and run `stash` again")
    else:
        missing = [part_name(i) for i in range(n_parts) if not (stash_dir / part_name(i)).is_file()]
        if missing:
            raise BundleError(f"missing part(s) in {stash_dir}: {', '.join(missing)} (of {n_parts}); carry them "
                              "and run `stash` again")
        if (stash_dir / part_name(n_parts)).is_file():
            raise BundleError(f"{stash_dir / part_name(n_parts)} exists: --parts {n_parts} looks wrong, or the stash "
                              f"holds parts of another bundle (carry {INDEX_NAME} to tell them apart)")
    return [stash_dir / part_name(i) for i in range(n_parts)]


def read_bundle(paths: list[Path], blob_dir: Path) -> dict:
    """Stream the tar through; write every blob to blob_dir after checking its hash. Returns the manifest."""
    reader = ConcatReader(paths)
    manifest = None
    seen = set()

    span = [0, 0]  # stream bytes of the member being read (tarfile reads ahead: reader.pos is further on)

    def where() -> str:
        return f"at stream bytes {span[0]}..{span[1]} ({reader.parts_between(*span)})"

    try:
        with tarfile.open(fileobj=io.BufferedReader(reader, CHUNK), mode="r|") as tf:
            for member in tf:
                span[:] = [member.offset, member.offset_data + member.size]
                f = tf.extractfile(member)
                if f is None:
                    raise BundleError(f"unexpected tar member {member.name!r} {where()}")
                if manifest is None:
                    if member.name != MANIFEST_NAME:
                        raise BundleError(f"the stream does not start with {MANIFEST_NAME} (got {member.name!r}): "
                                          f"{paths[0].name} is damaged or not the first part")
                    try:
                        manifest = json.loads(f.read())
                    except ValueError as e:
                        raise BundleError(f"{MANIFEST_NAME} is damaged ({e}) {where()}") from e
                    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                        raise BundleError(f"not a {FORMAT} version {VERSION} bundle")
                    continue
                key = member.name.rpartition("/")[2]
                info = manifest["blobs"].get(key)
                if not member.name.startswith("blobs/") or info is None:
                    raise BundleError(f"unexpected tar member {member.name!r} {where()}")
                h = blob_hasher(info)
                tmp = blob_dir / (key + ".tmp")
                with open(tmp, "wb") as out:
                    size = copy_hashed(f, out, h)
                if size != info["bytes"] or h.hexdigest() != key:
                    what = (f"tensor blob ({info['dtype']} {info['shape']})" if info["kind"] == "tensor"
                            else "file blob")
                    raise BundleError(f"{what} {key[:16]}... fails its hash check {where()}: damaged")
                os.replace(tmp, blob_dir / key)
                seen.add(key)
    except (tarfile.TarError, EOFError, OSError) as e:
        span[:] = [span[1], reader.pos]
        raise BundleError(f"the bundle stream is damaged or truncated {where()}: {type(e).__name__}: {e}") from e
    finally:
        reader.close()
    if manifest is None:
        raise BundleError("the bundle stream is empty")
    lost = set(manifest["blobs"]) - seen
    if lost:
        span[:] = [span[1], sum(reader.sizes)]
        raise BundleError(f"the bundle stream ended after {len(seen)} of {len(manifest['blobs'])} blobs, "
                          f"{where()}: a damaged tar header or a missing or cut-short part")
    return manifest


def copy_hashed(src, out, h) -> int:
    """Copies the file object src to out in CHUNK pieces, feeding hasher h; returns the bytes copied."""
    size = 0
    while True:
        b = src.read(CHUNK)
        if not b:
            return size
        h.update(b)
        out.write(b)
        size += len(b)


def write_model(name: str, model: dict, blob_dir: Path, dest: Path, bundle_id: str) -> None:
    tmp = dest.with_name(f".{dest.name}.unpack-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for entry in model["files"]:
            path = tmp / entry["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            keys = entry["segments"] if "segments" in entry else [entry["blob"]]
            h = hashlib.sha256()
            with open(path, "wb") as out:
                for key in keys:
                    with open(blob_dir / key, "rb") as f:
                        copy_hashed(f, out, h)
            if h.hexdigest() != entry["sha256"] or path.stat().st_size != entry["bytes"]:
                raise BundleError(f"{name}/{entry['path']}: reassembled file differs from the packed one")
        (tmp / MARKER_NAME).write_text(json.dumps({"bundle_id": bundle_id, "name": name,
                                                   "source": model.get("source")}) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def already_unpacked(dest: Path, bundle_id: str, model: dict) -> bool:
    try:
        marker = json.loads((dest / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("bundle_id") == bundle_id and all(
        (dest / e["path"]).is_file() and (dest / e["path"]).stat().st_size == e["bytes"] for e in model["files"])


def unpack(dest_root: Path, n_parts: int, bundle_dir: Path, stash_dir: Path, overwrite: bool = False,
           keep_stash: bool = True) -> dict:
    if n_parts < 1:
        raise UsageError("--parts must be at least 1")
    index = stash(bundle_dir, stash_dir, quiet=False) if bundle_dir.is_dir() else read_index(stash_dir / INDEX_NAME)
    paths = locate_parts(stash_dir, n_parts, index)
    t0 = time.time()
    dest_root.mkdir(parents=True, exist_ok=True)
    blob_dir = dest_root / f".bundle-blobs-{os.getpid()}"
    blob_dir.mkdir()
    try:
        manifest = read_bundle(paths, blob_dir)
        bundle_id = (index or {}).get("bundle_id") or hashlib.sha256(
            json.dumps(manifest, indent=1, sort_keys=True).encode()).hexdigest()[:16]
        for name, model in manifest["models"].items():
            dest = dest_root / name
            if already_unpacked(dest, bundle_id, model):
                print(f"unpack: {dest} already holds {name} of bundle {bundle_id}; kept")
                continue
            if dest.exists() and not overwrite:
                raise UsageError(f"{dest} exists and is not {name} of bundle {bundle_id}; pass --overwrite "
                                 "to replace it")
            write_model(name, model, blob_dir, dest, bundle_id)
            n_t = sum(manifest["blobs"][k]["kind"] == "tensor" for e in model["files"] for k in e.get("segments", []))
            print(f"unpack: {dest}  ({len(model['files'])} files, {n_t} tensors, "
                  f"{human(sum(e['bytes'] for e in model['files']))}) checked")
    finally:
        shutil.rmtree(blob_dir, ignore_errors=True)
    print(f"unpack: {len(manifest['models'])} model(s) in {dest_root} from {n_parts} part(s), "
          f"every tensor and file hash checked, {time.time() - t0:.1f} s")
    if not keep_stash:
        for p in paths:
            p.unlink()
    return manifest


# ---- command line ---------------------------------------------------------------------------------
def parse_model(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=MODEL_DIR, got {spec!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/device_bundle.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the bundle parts (here)")
    p.add_argument("out_dir", type=Path, help="bundle folder, conventionally .devbundle (git-excluded)")
    p.add_argument("--part-mb", type=float, default=50.0, help="largest part in MiB (default 50; carry limit 64)")
    p.add_argument("models", nargs="+", type=parse_model, metavar="NAME=MODEL_DIR")
    s = sub.add_parser("stash", help="copy the carried parts into the stash (GPU machine, every call)")
    u = sub.add_parser("unpack", help="check and reassemble the models (GPU machine, once all parts are stashed)")
    u.add_argument("dest_root", type=Path, help="models are written to DEST_ROOT/NAME/")
    u.add_argument("--parts", type=int, required=True, help="number of parts that pack printed")
    u.add_argument("--overwrite", action="store_true", help="replace existing DEST_ROOT/NAME directories")
    u.add_argument("--drop-stash", action="store_true", help="delete the stashed parts after a good unpack")
    for q in (s, u):
        q.add_argument("--bundle-dir", type=Path, default=Path(DEFAULT_BUNDLE_DIR),
                       help=f"where this call's carried parts are (default {DEFAULT_BUNDLE_DIR})")
        q.add_argument("--stash", type=Path, default=Path(DEFAULT_STASH), help=f"stash folder (default {DEFAULT_STASH})")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "pack":
            pack(args.out_dir, args.part_mb, args.models)
        elif args.cmd == "stash":
            stash(args.bundle_dir, args.stash)
        else:
            unpack(args.dest_root, args.parts, args.bundle_dir, args.stash, args.overwrite,
                   keep_stash=not args.drop_stash)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
