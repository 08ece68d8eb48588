"""benchmarks/device_bundle.py: pack / stash / unpack round trips, deduplication, damaged and missing parts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

from benchmarks import device_bundle as db


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def files_of(model_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in sorted(model_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A sharded random Llama and three conversions of it (W4 mse twice with different activation bits:
    identical weight codes, scales and offsets; W2 rtn single-file)."""
    from quant_tools.convert import main

    root = tmp_path_factory.mktemp("bundle-models")
    src = make_tiny_llama(root / "src", hidden=128, intermediate=256, layers=2, vocab=512,
                          max_shard_size="200KB")
    assert len(list(src.glob("*.safetensors"))) > 1 and (src / "model.safetensors.index.json").is_file()
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}\n")
    (src / ".convert-args").write_text("dotfiles stay behind\n")
    out = {"src": src}
    for name, args in {"w4a16": ["--w-bits", "4", "--method", "mse"],
                       "w4a8": ["--w-bits", "4", "--a-bits", "8", "--method", "mse"],
                       "w2a16": ["--w-bits", "2", "--max-shard-size", "10GB"]}.items():
        assert main([str(src), str(root / name), *args, "--no-progress"]) == 0
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def bundle(models, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bundle") / ".devbundle"
    index = db.pack(out, 0.1, [(n, p) for n, p in models.items()])  # 0.1 MiB parts: several of them
    return out, index


def test_roundtrip_dedup(models, bundle, tmp_path, capsys):
    out, index = bundle
    parts = sorted(out.glob("bundle.part-*"))
    assert len(parts) == len(index["parts"]) >= 3
    assert all(p.stat().st_size <= 0.1 * 2**20 for p in parts)
    # Deduplicated: the conversions share embeddings, norms and lm_head with each other (and w4a16/w4a8
    # all their weights), so the bundle is far smaller than the sum of the checkpoints.
    source_bytes = sum(p.stat().st_size for m in models.values() for p in m.iterdir() if p.is_file())
    w4a8_bytes = sum(p.stat().st_size for p in models["w4a8"].iterdir())
    assert index["total_bytes"] < source_bytes - w4a8_bytes
    stash_dir, dest = tmp_path / "stash", tmp_path / "models"
    # One part per "call": the bundle dir holds only that part (and the index) each time.
    carried = tmp_path / "carried"
    for p in parts:
        shutil.rmtree(carried, ignore_errors=True)
        carried.mkdir()
        shutil.copy(p, carried)
        shutil.copy(out / db.INDEX_NAME, carried)
        db.stash(carried, stash_dir)
    assert "complete" in capsys.readouterr().out
    shutil.rmtree(carried)
    db.unpack(dest, len(parts), carried, stash_dir)
    for name, src in models.items():
        got = dest / name
        assert files_of(got) == files_of(src), name  # byte-identical files, shards and index included
        ref, new = tensors_of(src), tensors_of(got)
        assert ref.keys() == new.keys()
        for k in ref:
            assert ref[k].dtype == new[k].dtype and torch.equal(ref[k], new[k]), (name, k)
        assert not (got / ".convert-args").exists()
    assert len(list((dest / "src").glob("*.safetensors"))) > 1
    # Unpacking again keeps what is there; a foreign directory is refused without --overwrite.
    db.unpack(dest, len(parts), carried, stash_dir)
    assert "already holds" in capsys.readouterr().out
    (dest / "w2a16" / db.MARKER_NAME).unlink()
    with pytest.raises(db.UsageError, match="--overwrite"):
        db.unpack(dest, len(parts), carried, stash_dir)
    db.unpack(dest, len(parts), carried, stash_dir, overwrite=True)
    assert files_of(dest / "w2a16") == files_of(models["w2a16"])


def test_cli_pack_prints_parts(models, tmp_path, capsys):
    out = tmp_path / "b"
    assert db.main(["pack", str(out), "--part-mb", "0.25", f"a={models['w4a16']}", f"b={models['w4a8']}"]) == 0
    text = capsys.readouterr().out
    n = len(list(out.glob("bundle.part-*")))
    assert text.rstrip().endswith(f"parts: {n}")
    index = json.loads((out / db.INDEX_NAME).read_text())
    # w4a8 differs from w4a16 only in config.json: it adds about a kilobyte (plus tar headers).
    _, _, stats = db.scan_models([("a", models["w4a16"]), ("b", models["w4a8"])])
    assert stats[1]["new_bytes"] < 2000 < stats[0]["new_bytes"]
    assert index["total_bytes"] < sum(p.stat().st_size for p in models["w4a16"].iterdir()) + 128 * 1024
    assert db.main(["unpack", str(tmp_path / "m"), "--parts", str(n), "--bundle-dir", str(out),
                    "--stash", str(tmp_path / "s")]) == 0
    assert files_of(tmp_path / "m" / "b") == files_of(models["w4a8"])
    assert db.main(["pack", str(out), "a=" + str(tmp_path / "nope")]) == 2


def stash_all(out: Path, stash_dir: Path, skip: set[str] = frozenset()) -> None:
    stash_dir.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.name not in skip:
            shutil.copy(p, stash_dir)


def test_missing_part(bundle, tmp_path, capsys):
    out, index = bundle
    stash_dir = tmp_path / "stash"
    stash_all(out, stash_dir, skip={"bundle.part-01"})
    n = len(index["parts"])
    rc = db.main(["unpack", str(tmp_path / "m"), "--parts", str(n), "--bundle-dir", str(tmp_path / "none"),
                  "--stash", str(stash_dir)])
    err = capsys.readouterr().err
    assert rc == 1 and "bundle.part-01: missing" in err and "carry" in err
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())
    # Without the index as well: still named.
    (stash_dir / db.INDEX_NAME).unlink()
    with pytest.raises(db.BundleError, match=r"missing part\(s\).*bundle.part-01"):
        db.unpack(tmp_path / "m", n, tmp_path / "none", stash_dir)
    # A wrong count against the index.
    shutil.copy(out / db.INDEX_NAME, stash_dir)
    with pytest.raises(db.BundleError, match=f"has {n} parts"):
        db.unpack(tmp_path / "m", n - 1, tmp_path / "none", stash_dir)


@pytest.mark.parametrize("with_index", [True, False])
def test_corrupt_part(bundle, tmp_path, with_index):
    out, index = bundle
    stash_dir = tmp_path / "stash"
    stash_all(out, stash_dir)
    if not with_index:
        (stash_dir / db.INDEX_NAME).unlink()
    victim = stash_dir / "bundle.part-02"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    with pytest.raises(db.BundleError, match="part-02") as exc:
        db.unpack(tmp_path / "m", len(index["parts"]), tmp_path / "none", stash_dir)
    assert ("damaged" in str(exc.value)) or ("hash check" in str(exc.value))
    assert not (tmp_path / "m").exists() or not any(p.name in {"src", "w4a16", "w4a8", "w2a16"}
                                                    for p in (tmp_path / "m").iterdir())


def test_truncated_last_part_without_index(bundle, tmp_path):
    out, index = bundle
    stash_dir = tmp_path / "stash"
    stash_all(out, stash_dir)
    (stash_dir / db.INDEX_NAME).unlink()
    last = stash_dir / index["parts"][-1]["file"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    with pytest.raises(db.BundleError, match="damaged|truncated|cut-short"):
        db.unpack(tmp_path / "m", len(index["parts"]), tmp_path / "none", stash_dir)


def test_stash_checks_carried_parts(bundle, tmp_path, capsys):
    out, index = bundle
    carried, stash_dir = tmp_path / "carried", tmp_path / "stash"
    carried.mkdir()
    shutil.copy(out / db.INDEX_NAME, carried)
    data = bytearray((out / "bundle.part-00").read_bytes())
    data[100] ^= 1
    (carried / "bundle.part-00").write_bytes(bytes(data))
    with pytest.raises(db.BundleError, match="part-00.*damaged"):
        db.stash(carried, stash_dir)
    assert not (stash_dir / "bundle.part-00").exists()
    # A new bundle's index drops the parts of an older one from the stash.
    (stash_dir / "bundle.part-00").write_bytes(b"old")
    old = dict(index, bundle_id="0" * 16)
    (stash_dir / db.INDEX_NAME).write_text(json.dumps(old))
    shutil.copy(out / "bundle.part-00", carried)
    db.stash(carried, stash_dir)
    text = capsys.readouterr().out
    assert "replaces" in text and f"1 of {len(index['parts'])} parts" in text
    assert (stash_dir / "bundle.part-00").read_bytes() == (out / "bundle.part-00").read_bytes()
