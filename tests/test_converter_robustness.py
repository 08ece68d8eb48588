"""The converter under bad input, failing disks and interruption (beyond tests/test_convert.py).

Every case checks the whole contract, not only the message: exit status (2 bad input, 1 write
failure, 130 / killed interruption), one ``error:`` line naming the file, tensor or option and the
fix, no traceback, SRC byte-identical, no DST and no temporary directory left (or the previous DST
byte-identical when one existed), and that a re-run then succeeds.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_tiny_llama
from safetensors.torch import load_file, save_file
from test_convert import leftovers, tree_digest

from quant_tools.convert import main as convert_main


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("pristine") / "src")


@pytest.fixture
def src(pristine, tmp_path) -> Path:
    """A private copy of the tiny Llama (tests edit it)."""
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "src"))


def cli(*args: str, preexec_fn=None, wait=True, timeout=300):
    cmd = [sys.executable, "-m", "quant_tools.convert", *args, "--no-progress"]
    kw = {"cwd": REPO, "text": True, "preexec_fn": preexec_fn}  # preexec_fn: this test process forks no threads
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, **kw)


def expect_refused(tmp_path, capsys, src: Path, patterns, *extra, dst: Path | None = None, code=2) -> str:
    """Run the converter in process; check exit code, message, SRC untouched, no DST, no leftovers."""
    dst = dst or tmp_path / "dst"
    before = tree_digest(src) if src.is_dir() else None
    dst_before = tree_digest(dst) if dst.is_dir() else None
    got = convert_main([str(src), str(dst), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert got == code, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for p in [patterns] if isinstance(patterns, str) else patterns:
        assert p in err, err
    if before is not None:
        assert tree_digest(src) == before, "SRC was modified"
    if dst_before is None:
        assert not dst.exists(), "a partial DST was left"
    else:
        assert tree_digest(dst) == dst_before, "the existing DST was modified"
    assert leftovers(dst.parent) == [], "a temporary directory was left"
    return err


def edit_tensors(src: Path, fn) -> None:
    f = src / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


def edit_config(src: Path, fn) -> None:
    cfg = json.loads((src / "config.json").read_text())
    fn(cfg)
    (src / "config.json").write_text(json.dumps(cfg))


# ---- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_inf_weight(tmp_path, capsys, src, value):
    edit_tensors(src, lambda t: t["model.layers.0.self_attn.k_proj.weight"].__setitem__((2, 5), value))
    expect_refused(tmp_path, capsys, src, [("model.layers.0.self_attn.k_proj.weight: weight has 1 NaN/inf value(s) "
                                           "(first at index [2, 5])"), "fix the source checkpoint"],
                   "--w-bits", "4")


def test_nan_in_a_copied_tensor(tmp_path, capsys, src):
    # lm_head is not quantized but copied: a NaN there would still make every output NaN.
    edit_tensors(src, lambda t: t["lm_head.weight"].__setitem__((0, 0), float("nan")))
    expect_refused(tmp_path, capsys, src, "lm_head.weight: weight has 1 NaN/inf value(s)", "--w-bits", "4")


def test_unsupported_layer_type(tmp_path, capsys, src):
    edit_tensors(src, lambda t: t.update({"model.layers.1.mlp.experts.0.w1.weight": torch.zeros(8, 64)}))
    expect_refused(tmp_path, capsys, src, [("unsupported layer type(s) in the decoder: "
                                           "['model.layers.1.mlp.experts.0.w1.weight']"), "q_proj"],
                   "--w-bits", "4")


def test_linear_weight_not_2d(tmp_path, capsys, src):
    edit_tensors(src, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight",
                                              t["model.layers.0.mlp.up_proj.weight"].reshape(2, 80, 64).contiguous()))
    expect_refused(tmp_path, capsys, src, ["model.layers.0.mlp.up_proj.weight", ("expects a 2-D weight [N, K], "
                                           "got shape (2, 80, 64)")], "--w-bits", "4")


def test_integer_linear_weight(tmp_path, capsys, src):
    edit_tensors(src, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight",
                                              t["model.layers.0.mlp.down_proj.weight"].to(torch.int8)))
    expect_refused(tmp_path, capsys, src, "model.layers.0.mlp.down_proj.weight: dtype torch.int8 is not supported",
                   "--w-bits", "4")


@pytest.mark.parametrize("edit,pattern", [
    (lambda c: c.pop("architectures"), "architecture unknown is not supported"),
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "architecture ['GPT2LMHeadModel'] is not supported"),
    (lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}), "is already quantized (gptq)"),
])
def test_unsupported_config(tmp_path, capsys, src, edit, pattern):
    edit_config(src, edit)
    expect_refused(tmp_path, capsys, src, pattern, "--w-bits", "4")


def test_invalid_config_json(tmp_path, capsys, src):
    (src / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    expect_refused(tmp_path, capsys, src, [f"{src / 'config.json'}: invalid JSON"], "--w-bits", "4")


def test_corrupt_safetensors_header(tmp_path, capsys, src):
    f = src / "model.safetensors"
    data = f.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    header = data[8:8 + hlen].replace(b'"BF16"', b'"XX16"', 1)  # valid JSON, a dtype safetensors rejects
    f.write_bytes(data[:8] + header + data[8 + hlen:])
    expect_refused(tmp_path, capsys, src, [f"{f}: cannot read this safetensors file", "re-download or re-save it"],
                   "--w-bits", "4")


def test_garbage_safetensors_header(tmp_path, capsys, src):
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"
    f.write_bytes(bytes(data))
    expect_refused(tmp_path, capsys, src, [f"{f}: corrupt safetensors header"], "--w-bits", "4")


@pytest.mark.parametrize("extra,pattern", [
    (["--w-bits", "4", "--a-bits", "0"], "'a_bits'] = 0"),
    (["--w-bits", "4", "--a-bits", "12"], "'a_bits'] = 12"),
    (["--w-bits", "4", "--a-bits", "17"], "'a_bits'] = 17"),
    (["--w-bits", "-1"], "'w_bits'] = -1: unsupported bit width"),
    (["--w-bits", "4", "--group-size", "0"], "'group_size'] = 0"),
    (["--w-bits", "4", "--group-size", "-2"], "'group_size'] = -2"),
    (["--w-bits", "4", "--group-size", "31"], "groups must cover whole 32-bit words"),
    (["--w-bits", "4", "--a-bits", "2", "--group-size", "96"], "multiple of 128"),
    (["--w-bits", "4", "--layer-bits", "model.layers.0.mlp.down_proj=99"], "layer_bits.model.layers.0.mlp.down_proj'] = 99"),
])
def test_out_of_range_options(tmp_path, capsys, src, extra, pattern):
    expect_refused(tmp_path, capsys, src, pattern, *extra)


@pytest.mark.parametrize("extra,pattern", [
    (["--w-bits", "four"], "argument --w-bits: invalid int value: 'four'"),
    (["--w-bits", "4", "--max-shard-size", "lots"], "invalid size 'lots'"),
    (["--w-bits", "4", "--method", "gptq2"], "argument --method: invalid choice: 'gptq2'"),
    ([], "the following arguments are required: --w-bits"),
])
def test_unparsable_options(tmp_path, src, extra, pattern):
    res = cli(str(src), str(tmp_path / "dst"), *extra)
    assert res.returncode == 2 and pattern in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("where", ["dst-is-parent-of-src", "dst-is-src-via-symlink", "dst-inside-src-via-symlink"])
def test_dst_overlapping_src_is_refused(tmp_path, capsys, pristine, where):
    """With --overwrite, a DST that contains SRC would be deleted with SRC in it at the final swap."""
    import shutil

    parent = tmp_path / "models"
    src = Path(shutil.copytree(pristine, parent / "src"))
    before = tree_digest(parent)
    if where == "dst-is-parent-of-src":
        dst = parent
    elif where == "dst-is-src-via-symlink":
        (tmp_path / "link").symlink_to(src)
        dst = tmp_path / "link"
    else:
        (tmp_path / "link").symlink_to(src)
        dst = tmp_path / "link" / "out"
    code = convert_main([str(src), str(dst), "--w-bits", "4", "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "must not be SRC, inside it or contain it" in err, err
    assert tree_digest(parent) == before
    assert leftovers(tmp_path) == [] and leftovers(parent) == []


# ---- failing disks ----------------------------------------------------------------------------------
def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_for_real(tmp_path, src):
    """A real failing write (file size limit: the kernel refuses the write, as on a full disk)."""
    before = tree_digest(src)
    dst = tmp_path / "dst"
    res = cli(str(src), str(dst), "--w-bits", "4", preexec_fn=_file_size_limit(20_000))
    assert res.returncode == 1, res.stderr
    assert "error: writing" in res.stderr and "File too large" in res.stderr, res.stderr
    assert "shard-00000.safetensors" in res.stderr and "nothing was written" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert not dst.exists() and leftovers(tmp_path) == [] and tree_digest(src) == before
    assert cli(str(src), str(dst), "--w-bits", "4").returncode == 0  # room again: the re-run succeeds


def test_disk_full_with_an_existing_dst(tmp_path, src):
    dst = tmp_path / "dst"
    assert cli(str(src), str(dst), "--w-bits", "8").returncode == 0
    old = tree_digest(dst)
    res = cli(str(src), str(dst), "--w-bits", "4", "--overwrite", preexec_fn=_file_size_limit(20_000))
    assert res.returncode == 1 and "File too large" in res.stderr, res.stderr
    assert tree_digest(dst) == old, "a failed --overwrite must leave the previous DST as it was"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["config", "index", "rename"])
def test_read_only_disk_late_in_the_run(tmp_path, capsys, src, monkeypatch, target):
    """EROFS at the last steps (config.json, the index, the final rename): still nothing left behind."""
    import quant_tools.checkpoint as ckpt_mod

    def erofs(*a, **k):
        raise OSError(30, "Read-only file system", str(a[0]) if a else None)

    if target == "rename":
        real = os.replace

        def replace(a, b):
            if Path(b).name == "dst":
                erofs(b)
            return real(a, b)

        monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    else:
        real_write = Path.write_text
        name = "config.json" if target == "config" else "model.safetensors.index.json"

        def write_text(self, *a, **k):
            if self.name == name:
                erofs(self)
            return real_write(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
    expect_refused(tmp_path, capsys, src, ["Read-only file system", "nothing was written"], "--w-bits", "4", code=1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_for_real(tmp_path, capsys, src):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        expect_refused(tmp_path, capsys, src, ["cannot create the output next to", "Permission denied"],
                       "--w-bits", "4", dst=ro / "dst")
    finally:
        ro.chmod(0o755)


# ---- interruption -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_src(tmp_path_factory) -> Path:
    """Big enough (fp32, mse) that a conversion takes a few seconds: it can be killed mid-way."""
    return make_tiny_llama(tmp_path_factory.mktemp("slow") / "src", hidden=512, intermediate=1536, layers=6,
                           dtype=torch.float32)


def _kill_when(proc, tmp_path: Path, ready, sig=signal.SIGKILL, timeout=120):
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it could be interrupted: " + proc.stderr.read()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc.returncode


def test_killed_while_writing_shards_then_rerun(tmp_path, slow_src):
    before = tree_digest(slow_src)
    dst = tmp_path / "dst"
    proc = cli(str(slow_src), str(dst), "--w-bits", "3", "--method", "mse", "--max-shard-size", "1MB", wait=False)
    code = _kill_when(proc, tmp_path, lambda: any(tmp_path.glob(".tmp-dst-*/shard-*.safetensors")))
    assert code == -signal.SIGKILL
    assert not dst.exists() and tree_digest(slow_src) == before
    assert leftovers(tmp_path), "expected the killed run's temporary directory (removed by the next run)"
    res = cli(str(slow_src), str(dst), "--w-bits", "3")
    assert res.returncode == 0, res.stderr
    assert leftovers(tmp_path) == [] and (dst / "config.json").is_file()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_overwrite_keeps_the_previous_dst(tmp_path, slow_src, sig):
    dst = tmp_path / "dst"
    assert cli(str(slow_src), str(dst), "--w-bits", "8").returncode == 0
    old = tree_digest(dst)
    proc = cli(str(slow_src), str(dst), "--w-bits", "3", "--method", "mse", "--overwrite", wait=False)
    code = _kill_when(proc, tmp_path, lambda: bool(leftovers(tmp_path)) and time.sleep(0.3) is None, sig=sig)
    assert code in (-signal.SIGKILL, 130), code
    assert tree_digest(dst) == old, "an interrupted --overwrite must leave the previous DST as it was"
    if sig == signal.SIGTERM:
        assert leftovers(tmp_path) == [] and "interrupted: nothing was written" in proc.stderr.read()
    res = cli(str(slow_src), str(dst), "--w-bits", "3", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["w_bits"] == 3
    assert leftovers(tmp_path) == []


def test_killed_during_the_final_swap_is_recovered(tmp_path, capsys, pristine):
    """Killed between moving the old DST aside and moving the new one in: the next run puts it back."""
    dst = tmp_path / "dst"
    assert convert_main([str(pristine), str(dst), "--w-bits", "8", "--no-progress"]) == 0
    old = tree_digest(dst)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    aside = tmp_path / f".tmp-dst-{int(dead.stdout)}-old"
    os.replace(dst, aside)  # the state such a kill leaves: no DST, the old one aside
    (tmp_path / f".tmp-dst-{int(dead.stdout)}-abcd").mkdir()  # and the new, complete but not moved in
    capsys.readouterr()
    assert convert_main([str(pristine), str(dst), "--w-bits", "4", "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err  # the old DST is back, and not overwritten unasked
    assert tree_digest(dst) == old and leftovers(tmp_path) == []


# ---- the final rename ---------------------------------------------------------------------------------
def _patch_replace(monkeypatch, on_new_dst):
    """Call ``on_new_dst(a, b)`` when the complete temporary output is renamed to DST."""
    import quant_tools.checkpoint as ckpt_mod

    real = os.replace

    def replace(a, b):
        if Path(b).name == "dst" and Path(a).name.startswith(".tmp-dst-") and not Path(a).name.endswith("-old"):
            on_new_dst(a, b)
        return real(a, b)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_the_final_swap_is_held(tmp_path, capsys, pristine, monkeypatch, sig):
    """Ctrl-C / kill between moving the old DST aside and the new one in must not leave no DST."""
    from quant_tools.convert import _raise_interrupt

    dst = tmp_path / "dst"
    assert convert_main([str(pristine), str(dst), "--w-bits", "8", "--no-progress"]) == 0
    old_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # main() installs its own
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        _patch_replace(monkeypatch, lambda a, b: os.kill(os.getpid(), sig))
        capsys.readouterr()
        assert convert_main([str(pristine), str(dst), "--w-bits", "4", "--overwrite", "--no-progress"]) == 0
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    assert "the output is complete" in capsys.readouterr().err
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["w_bits"] == 4
    assert leftovers(tmp_path) == []


def test_failed_final_rename_restores_the_previous_dst(tmp_path, capsys, pristine, monkeypatch):
    dst = tmp_path / "dst"
    assert convert_main([str(pristine), str(dst), "--w-bits", "8", "--no-progress"]) == 0
    old = tree_digest(dst)

    def fail(a, b):
        raise OSError(5, "Input/output error", str(b))

    _patch_replace(monkeypatch, fail)
    capsys.readouterr()
    assert convert_main([str(pristine), str(dst), "--w-bits", "4", "--overwrite", "--no-progress"]) == 1
    assert "Input/output error" in capsys.readouterr().err
    assert tree_digest(dst) == old and leftovers(tmp_path) == []


def test_output_is_on_disk_before_the_rename(tmp_path, pristine, monkeypatch):
    """Every file of the new DST is fsynced before it is renamed into place (a power loss right
    after an --overwrite must not leave empty files where the previous checkpoint was)."""
    import quant_tools.checkpoint as ckpt_mod

    synced: set[str] = set()
    real_fsync = os.fsync

    def fsync(fd):
        synced.add(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    seen: dict[str, set[str]] = {}
    _patch_replace(monkeypatch, lambda a, b: seen.update(files={p.name for p in Path(a).iterdir()}, synced=set(synced)))
    assert convert_main([str(pristine), str(tmp_path / "dst"), "--w-bits", "4", "--no-progress"]) == 0
    assert seen["files"] and seen["files"] <= seen["synced"], seen
