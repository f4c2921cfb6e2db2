"""Issue 14 items 2-5: safetensors headers as strict as safetensors; file-system errors as one
paragraph; kill-safety of output directories (real SIGTERM / kill -9 of a real ``gemma4-bridge``
process at named points); outputs that follow the umask.

The kill tests pause the child at a named point with the documented test hook
``GEMMA4_BRIDGE_TEST_PAUSE_AT`` (gemma4_bridge/output.py) and signal it there.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from convert_helpers import copy_adapter, dir_digest
from safetensors import safe_open
from safetensors.torch import load_file

from gemma4_bridge.cli import main
from gemma4_bridge.errors import BridgeError
from gemma4_bridge.output import TEST_PAUSE_ENV, staged_files, sweep_leftovers
from gemma4_bridge.safetensors_header import read_safetensors_header

CLI = str(Path(sys.executable).with_name("gemma4-bridge"))

# -- item 2: the header rules are safetensors' own --------------------------------------------
_A = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
_B = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}
HEADERS: dict[str, tuple[bytes | dict | list, int]] = {
    # name: (header, bytes of data after it)
    "valid": ({"a": _A, "b": _B}, 32),
    "valid-metadata": ({"__metadata__": {"format": "pt"}, "a": _A, "b": _B}, 32),
    "valid-null-metadata": ({"__metadata__": None, "a": _A, "b": _B}, 32),
    "valid-extra-field": ({"a": {**_A, "note": 1}, "b": _B}, 32),
    "valid-empty": ({}, 0),
    "valid-zero-element": ({"a": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}, "b": {**_B, "data_offsets": [0, 16]}}, 16),
    "valid-scalar": ({"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, 4),
    "valid-unsorted": ({"b": _B, "a": _A}, 32),
    "overlapping": ({"a": _A, "b": {**_B, "data_offsets": [8, 24]}}, 24),
    "gap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": _B}, 32),
    "not-from-zero": ({"b": _B}, 32),
    "negative": ({"a": {**_A, "data_offsets": [-16, 0]}, "b": _B}, 32),
    "reversed": ({"a": {**_A, "data_offsets": [16, 0]}, "b": _B}, 32),
    "out-of-bounds": ({"a": _A, "b": {**_B, "shape": [8], "data_offsets": [16, 48]}}, 32),
    "trailing-bytes": ({"a": _A, "b": _B}, 40),
    "size-disagrees": ({"a": {**_A, "shape": [2, 3]}, "b": _B}, 32),
    "shape-not-list": ({"a": {**_A, "shape": 4}, "b": _B}, 32),
    "negative-dims": ({"a": {**_A, "shape": [-2, -2]}, "b": _B}, 32),
    "float-dims": ({"a": {**_A, "shape": [2.0, 2]}, "b": _B}, 32),
    "bool-dims": ({"a": {**_A, "shape": [True, 4]}, "b": _B}, 32),
    "huge-dims": ({"a": {**_A, "shape": [2**64]}, "b": _B}, 32),
    "three-offsets": ({"a": {**_A, "data_offsets": [0, 16, 3]}, "b": _B}, 32),
    "float-offsets": ({"a": {**_A, "data_offsets": [0, 16.0]}, "b": _B}, 32),
    "header-is-list": ([_A, _B], 32),
    "entry-not-object": ({"a": "F32", "b": {**_B, "data_offsets": [0, 16]}}, 16),
    "unknown-dtype": ({"a": {**_A, "dtype": "F33"}, "b": _B}, 32),
    "missing-dtype": ({"a": {"shape": [2, 2], "data_offsets": [0, 16]}, "b": _B}, 32),
    "sub-byte-tensor": ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2),
    "metadata-not-strings": ({"__metadata__": {"a": 1}, "a": _A, "b": _B}, 32),
    "metadata-list": ({"__metadata__": ["x"], "a": _A, "b": _B}, 32),
    "duplicate-field": (b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}', 16),
    "duplicate-tensor-last-wins": (b'{"a": ' + json.dumps(_A).encode() + b', "a": ' + json.dumps(_B).encode() + b"}", 32),
    "nan-literal": (b'{"a": {"dtype": "F32", "x": NaN, "shape": [4], "data_offsets": [0, 16]}}', 16),
    "not-utf8": (b'{"a\xff": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', 16),
    "trailing-nul": (json.dumps({"a": _A}).encode() + b"\0", 16),
    "trailing-space": (json.dumps({"a": _A}).encode() + b"   ", 16),
}


def _write(path: Path, header: bytes | dict | list, data_len: int) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256))
    return path


def _accepted(fn) -> bool:
    try:
        fn()
    except BridgeError:
        return False
    except Exception as exc:  # noqa: BLE001 - the safetensors library's own error types
        if "safetensors" in type(exc).__module__.lower() or "Safetensor" in type(exc).__name__:
            return False
        raise
    return True


@pytest.mark.parametrize("case", list(HEADERS))
def test_header_rules_match_safetensors(tmp_path, case) -> None:
    """Every reader (layout.read_safetensors_header, the converters' window reader) accepts exactly
    what safetensors.safe_open accepts. Before: 'overlapping', 'gap', 'not-from-zero', 'reversed',
    'trailing-bytes', 'size-disagrees'... were accepted and read as data; list headers crashed."""
    from gemma4_bridge.converters.safetensors_stream import SafetensorsReader

    path = _write(tmp_path / f"{case}.safetensors", *HEADERS[case])

    def reference() -> None:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())

    expected = _accepted(reference)
    assert expected == case.startswith("valid") or case in ("duplicate-tensor-last-wins", "trailing-space"), "case table"
    assert _accepted(lambda: read_safetensors_header(path)) == expected
    assert _accepted(lambda: SafetensorsReader(path)) == expected
    if not expected:
        with pytest.raises(BridgeError) as err:
            read_safetensors_header(path)
        assert str(path) in str(err.value) and "Fix:" in str(err.value)


def test_stricter_than_safetensors_only_for_array_entries(tmp_path) -> None:
    """serde reads ``"a": [dtype, shape, offsets]`` as an entry; we require an object (documented)."""
    path = _write(tmp_path / "array-entry.safetensors", {"a": ["F32", [4], [0, 16]]}, 16)
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["a"]
    with pytest.raises(BridgeError, match="tensor a: the entry is a JSON list"):
        read_safetensors_header(path)


def test_reader_refuses_a_file_replaced_after_its_header_was_checked(tmp_path) -> None:
    """The window reader keeps the file it validated open; a rename-over since is refused, not read."""
    from gemma4_bridge.converters.safetensors_stream import SafetensorsReader

    path = _write(tmp_path / "w.safetensors", {"a": _A, "b": _B}, 32)
    header = read_safetensors_header(path)
    _write(tmp_path / "new.safetensors", {"a": {**_A, "shape": [4]}, "b": _B}, 32).replace(path)
    with pytest.raises(BridgeError, match="changed while it was being read"):
        SafetensorsReader(path, header)


def test_serving_check_refuses_corrupt_offsets(tmp_path, all_linear_adapter, tiny_dir) -> None:
    """The vLLM front-end check (check_adapter + check_values, no engine needed) goes through the
    same validator. Before: overlapping offsets passed it and the server served them (issue 14)."""
    from gemma4_bridge.layout import Gemma4Layout
    from gemma4_bridge.plugins.vllm.adapter import ServingContext, check_adapter

    bad = copy_adapter(all_linear_adapter, tmp_path / "overlap")
    weights = bad / "adapter_model.safetensors"
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    begin, end = header[names[1]]["data_offsets"]
    header[names[1]]["data_offsets"] = [begin - 4, end - 4]
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    ctx = ServingContext(Gemma4Layout.from_model_dir(tiny_dir), enable_tower_connector_lora=True, max_lora_rank=8)
    with pytest.raises(BridgeError, match=f"tensor {names[1]}: data_offsets .* overlap"):
        check_adapter(bad, ctx)


def test_corrupt_base_shard_is_refused(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    """Base model headers go through the same validator (merge reads their offsets as data)."""
    import shutil

    base = Path(shutil.copytree(tiny_dir, tmp_path / "base"))
    (shard,) = sorted(base.glob("*.safetensors"))
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[1]
    header[name]["data_offsets"] = header[name]["data_offsets"][::-1]
    text = json.dumps(header).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    out = tmp_path / "merged"
    code, err = _run(capsys, "merge", str(all_linear_adapter), "--base", str(base), "-o", str(out))
    _assert_clean_refusal(code, err, "merge", out, str(shard), f"tensor {name}:", "reversed")


# -- item 3: file-system errors on the output side -------------------------------------------
def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def _assert_clean_refusal(code: int, err: str, command: str, out: Path, *words: str) -> None:
    assert code == 2, (code, err)
    assert err.startswith(f"gemma4-bridge {command}: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Fix:" in err and all(w in err for w in words), (words, err)
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp left behind"


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory no one may create entries in. As root (the CI box) permissions do not stop
    writes, so this sets the immutable attribute (chattr +i: EPERM even for root); as another
    user, mode 0555. Skipped where neither works (e.g. root on a file system without chattr)."""
    d = tmp_path / "locked"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("root without chattr +i here: cannot make a directory unwritable")
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def test_unwritable_output_parent(capsys, unwritable_dir, all_linear_adapter, tiny_dir) -> None:
    out = unwritable_dir / "out"
    code, err = _run(capsys, "convert", str(all_linear_adapter), "-o", str(out), "--base", str(tiny_dir))
    _assert_clean_refusal(code, err, "convert", out, "permission denied", str(out))


def test_unwritable_output_parent_to_create(capsys, unwritable_dir, all_linear_adapter, tiny_dir) -> None:
    out = unwritable_dir / "sub" / "out"  # the parent must be created first: mkdir fails
    code, err = _run(capsys, "merge", str(all_linear_adapter), "--base", str(tiny_dir), "-o", str(out))
    _assert_clean_refusal(code, err, "merge", out, "permission denied")


@pytest.mark.parametrize("depth", ["parent", "grandparent"])
def test_output_parent_is_a_file(capsys, tmp_path, all_linear_adapter, tiny_dir, depth) -> None:
    """Before: FileExistsError / NotADirectoryError tracebacks."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    out = blocker / "out" if depth == "parent" else blocker / "sub" / "out"
    code, err = _run(capsys, "convert", str(all_linear_adapter), "-o", str(out), "--base", str(tiny_dir))
    assert code == 2 and f"because {blocker} is a file" in err and "Fix:" in err, err
    assert blocker.read_text() == "mine"


@pytest.fixture
def tiny_tmpfs(tmp_path, all_linear_adapter):
    """A real file system with less room than the adapter (tmpfs; needs root + mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    room = (all_linear_adapter / "adapter_model.safetensors").stat().st_size // 2
    size_kib = max(8, room // 4096 * 4)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root / no CAP_SYS_ADMIN); see the injected ENOSPC test")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_real(capsys, tiny_tmpfs, all_linear_adapter, tiny_dir) -> None:
    """Before: an OSError traceback (ENOSPC)."""
    out = tiny_tmpfs / "out"
    code, err = _run(capsys, "convert", str(all_linear_adapter), "-o", str(out), "--base", str(tiny_dir))
    _assert_clean_refusal(code, err, "convert", out, "no space left", "partial output was removed", "MiB are free now")
    assert list(tiny_tmpfs.iterdir()) == [], "the temp dir and its partial file are gone"


def test_disk_full_injected(capsys, tmp_path, all_linear_adapter, tiny_dir, monkeypatch) -> None:
    """The same without mount rights: the writer fails with ENOSPC after the header, at the first
    tensor bytes (what a full disk does; injected where the bytes are written: adjacent tensors
    are copied as one run, so a small adapter has one data write)."""
    import gemma4_bridge.converters.safetensors_stream as stream

    calls: list[int] = []

    def failing(real):  # bytes are written by _write_all (buffers) or copy_range (kernel copies of file ranges)
        def write(f, data) -> None:
            calls.append(1)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(f, data)

        return write

    monkeypatch.setattr(stream, "_write_all", failing(stream._write_all))
    monkeypatch.setattr(stream, "copy_range", failing(stream.copy_range))
    out = tmp_path / "out"
    code, err = _run(capsys, "convert", str(all_linear_adapter), "-o", str(out), "--base", str(tiny_dir))
    _assert_clean_refusal(code, err, "convert", out, "no space left", "partial output was removed")
    assert [p.name for p in tmp_path.iterdir()] == []


# -- item 4: kill-safety, with real signals to a real gemma4-bridge process --------------------
class Paused:
    """A ``gemma4-bridge`` child stopped at a named point of its output commit."""

    def __init__(self, argv: list[str], point: str, *, code: str | None = None) -> None:
        env = {**os.environ, TEST_PAUSE_ENV: point, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-c", code, *argv] if code else [CLI, *argv]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # blocks until the child reaches the point (or exits)
        assert line.strip() == f"gemma4-bridge: paused at {point}", (line, self.proc.poll())

    def signal(self, sig: int) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


def _convert_argv(adapter: Path, out: Path, base: Path, *extra: str) -> list[str]:
    return ["convert", str(adapter), "-o", str(out), "--base", str(base), *extra]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, all_linear_adapter, tiny_dir) -> None:
    """Before: SIGTERM killed convert outright, leaving .OUT.tmp-* with the partial file."""
    out = tmp_path / "out"
    before = dir_digest(all_linear_adapter)
    child = Paused(_convert_argv(all_linear_adapter, out, tiny_dir), "written")
    assert len(_leftovers(out)) == 1  # the complete temp dir, about to be renamed
    code, err = child.signal(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM; no output was written (temporary files removed)" in err and "Traceback" not in err
    assert not out.exists() and _leftovers(out) == []
    assert dir_digest(all_linear_adapter) == before


def test_sigterm_stops_merge_too(tmp_path, all_linear_adapter, tiny_dir) -> None:
    out = tmp_path / "merged"
    child = Paused(["merge", str(all_linear_adapter), "--base", str(tiny_dir), "-o", str(out)], "created")
    code, err = child.signal(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM; no output was written" in err, err
    assert not out.exists() and _leftovers(out) == []


def test_kill9_leftovers_are_removed_by_the_next_run(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    """Before: every kill -9 left a .OUT.tmp-* directory that no later run removed. A leftover of a
    live process (here a sleeping one) is never touched."""
    out = tmp_path / "out"
    child = Paused(_convert_argv(all_linear_adapter, out, tiny_dir), "written")
    code, _ = child.signal(signal.SIGKILL)
    assert code == -signal.SIGKILL
    (stale,) = _leftovers(out)
    assert stale.startswith(f".out.tmp-{child.proc.pid}-")
    with subprocess.Popen(["sleep", "30"]) as live:
        other = tmp_path / f".out.tmp-{live.pid}-0123abcd"
        other.mkdir()
        try:
            code, err = _run(capsys, *_convert_argv(all_linear_adapter, out, tiny_dir))
            assert code == 0, err
            assert _leftovers(out) == [other.name], "the dead one removed, the live one kept"
        finally:
            live.kill()
    assert load_file(out / "adapter_model.safetensors")


def _old_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    return out


def test_force_kill9_never_leaves_out_missing(capsys, tmp_path, all_linear_adapter, tiny_dir) -> None:
    """--force swaps in one renameat2(RENAME_EXCHANGE): killed right after it, OUT is the new
    output, complete; the old one (in the temp name) is removed by the next run. Before: a kill
    between the two renames left OUT missing."""
    out = _old_output(tmp_path)
    child = Paused(_convert_argv(all_linear_adapter, out, tiny_dir, "--force"), "exchanged")
    child.signal(signal.SIGKILL)
    assert not (out / "old.txt").exists()
    reference = load_file(_reference_convert(capsys, tmp_path, all_linear_adapter, tiny_dir))
    got = load_file(out / "adapter_model.safetensors")
    assert got.keys() == reference.keys() and all(got[k].equal(v) for k, v in reference.items())
    (old,) = _leftovers(out)
    assert (tmp_path / old / "old.txt").is_file()
    sweep_leftovers(tmp_path, "out")
    assert _leftovers(out) == []


def _reference_convert(capsys, tmp_path: Path, adapter: Path, base: Path) -> Path:
    ref = tmp_path / "reference"
    code, err = _run(capsys, *_convert_argv(adapter, ref, base))
    assert code == 0, err
    return ref / "adapter_model.safetensors"


# The child of the fallback tests: the same CLI with renameat2(RENAME_EXCHANGE) reported unsupported
# (as on a kernel or file system without it).
NO_EXCHANGE = (
    "import sys; import gemma4_bridge.output as o; real = o._renameat2; "
    "o._renameat2 = lambda a, b, flags: False if flags == o._RENAME_EXCHANGE else real(a, b, flags); "
    "from gemma4_bridge.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_force_fallback_kill9_between_renames_is_restored(tmp_path, all_linear_adapter, tiny_dir) -> None:
    """Without RENAME_EXCHANGE: killed between moving the old OUT aside and putting the new one in
    place, the next run puts the old OUT back (it never stays missing)."""
    out = _old_output(tmp_path)
    child = Paused(_convert_argv(all_linear_adapter, out, tiny_dir, "--force"), "moved-aside", code=NO_EXCHANGE)
    child.signal(signal.SIGKILL)
    assert not out.exists() and f".out.old-{child.proc.pid}" in _leftovers(out)
    sweep_leftovers(tmp_path, "out")  # what the next run does first
    assert (out / "old.txt").read_text() == "the previous output"
    assert _leftovers(out) == []


def test_force_fallback_sigterm_between_renames_completes(tmp_path, all_linear_adapter, tiny_dir) -> None:
    """A SIGTERM during the commit waits for it: OUT is the complete new output, and the command says so."""
    out = _old_output(tmp_path)
    child = Paused(_convert_argv(all_linear_adapter, out, tiny_dir, "--force"), "moved-aside", code=NO_EXCHANGE)
    code, err = child.signal(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and f"interrupted by SIGTERM; {out} was already complete" in err, err
    assert not (out / "old.txt").exists() and load_file(out / "adapter_model.safetensors")
    assert _leftovers(out) == []


def test_staged_files_sweep_dead_leftovers(tmp_path) -> None:
    """train.save_adapter into an existing directory stages through the same mechanism."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".gemma4-bridge.tmp-{dead.pid}-00ff00ff"
    stale.mkdir()
    (tmp_path / "trainer_state.json").write_text("{}")
    with staged_files(tmp_path) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "trainer_state.json"]


def test_single_file_outputs_use_the_same_mechanism(tmp_path) -> None:
    """export-gguf writes one file through atomic_output_file: umask modes (mkstemp gave 0600),
    dead processes' temp files swept, live ones kept, --force replaces in one rename."""
    from gemma4_bridge.output import atomic_output_file

    out = tmp_path / "a.gguf"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".a.gguf.tmp-{dead.pid}-00ff00ff").write_bytes(b"partial")
    with subprocess.Popen(["sleep", "30"]) as live:
        kept = tmp_path / f".a.gguf.tmp-{live.pid}-0123abcd"
        kept.write_bytes(b"being written")
        previous = os.umask(0o027)
        try:
            with atomic_output_file(out) as tmp:
                tmp.write_bytes(b"new")
        finally:
            os.umask(previous)
            live.kill()
    assert out.read_bytes() == b"new" and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert _leftovers(out) == [kept.name]
    with pytest.raises(BridgeError, match="already exists"), atomic_output_file(out):
        pass
    with atomic_output_file(out, force=True) as tmp:
        tmp.write_bytes(b"newer")
    assert out.read_bytes() == b"newer" and _leftovers(out) == []  # the sleeper is gone now: swept


# -- item 5: outputs follow the umask ---------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(capsys, tmp_path, all_linear_adapter, tiny_dir, mask) -> None:
    """As PEFT's save_pretrained: dirs 0o777 & ~umask, files 0o666 & ~umask. Before: OUT was 0700
    (mkdtemp) whatever the umask, so a server running as another user could not read it."""
    previous = os.umask(mask)
    try:
        for command, out in (("convert", tmp_path / "converted"), ("merge", tmp_path / "merged")):
            argv = [command, str(all_linear_adapter), "-o", str(out), "--base", str(tiny_dir)]
            code, err = _run(capsys, *argv)
            assert code == 0, err
            for path in [out, *out.rglob("*")]:
                want = (0o777 if path.is_dir() else 0o666) & ~mask
                assert stat.S_IMODE(path.stat().st_mode) == want, (command, path, oct(path.stat().st_mode), oct(want))
    finally:
        os.umask(previous)


def test_ignored_signals_stay_ignored() -> None:
    """Under ``nohup`` SIGHUP is ignored: the CLI's handlers must not turn it back on."""
    from gemma4_bridge.output import interrupt_on_signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with interrupt_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not term
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGHUP, previous)
