"""The one atomic writer: modes, no partial file on failure, O_EXCL on the temporary name,
and every writer of state or secret files going through it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.agent.errors import AgentError
from gateway.agent.files import write_private_file
from gateway.core.files import fsync_directory, replace_symlink, write_atomic
from gateway.core.tlsutil import generate_ca, write_pem_files
from gateway.join.challenge import load_keys_file, write_new_keys_file

ROOT = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize(
    ("kwargs", "mode"),
    [({}, 0o600), ({"mode": 0o600}, 0o600), ({"mode": 0o644}, 0o644), ({"mode": 0o640}, 0o640)],
    ids=[
        "a file is a secret (0600) unless the caller says otherwise",
        "a secret is 0600",
        "a certificate may be 0644",
        "any mode asked for is the mode set",
    ],
)
def test_the_file_ends_with_the_mode_asked_for(
    tmp_path: Path, kwargs: dict[str, int], mode: int
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    target.chmod(0o666)  # the old file's mode is not inherited
    write_atomic(target, b"new", **kwargs)
    assert target.read_bytes() == b"new"
    assert _mode(target) == mode
    assert _leftovers(tmp_path) == []


def test_the_umask_cannot_widen_a_secret(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_atomic(tmp_path / "s", b"secret")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "s") == 0o600


def test_parents_are_made_private_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "a" / "f", b"x")
    write_atomic(tmp_path / "a" / "b" / "f", b"x", make_parents=True)
    assert _mode(tmp_path / "a" / "b") == 0o700


def _suffixes(*names: str) -> tuple[Callable[[], str], list[str]]:
    used: list[str] = []
    it: Iterator[str] = iter(names)

    def suffix() -> str:
        used.append(next(it))
        return used[-1]

    return suffix, used


def test_a_taken_temporary_name_is_never_opened_or_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    # Someone with write access to the directory plants the next temporary name as a
    # symlink (and a leftover file at another): O_EXCL refuses both, another name is used.
    (tmp_path / ".keys.planted.tmp").symlink_to(victim)
    (tmp_path / ".keys.leftover.tmp").write_bytes(b"crash leftover")
    suffix, used = _suffixes("planted", "leftover", "free")
    write_atomic(tmp_path / "keys", b"fresh", suffix=suffix)
    assert used == ["planted", "leftover", "free"]
    assert (tmp_path / "keys").read_bytes() == b"fresh"
    assert victim.read_bytes() == b"do not touch"
    assert (tmp_path / ".keys.planted.tmp").is_symlink()
    assert (tmp_path / ".keys.leftover.tmp").read_bytes() == b"crash leftover"


def test_when_every_temporary_name_is_taken_the_target_is_untouched(tmp_path: Path) -> None:
    target = tmp_path / "keys"
    target.write_bytes(b"old")
    (tmp_path / ".keys.same.tmp").write_bytes(b"")
    suffix, used = _suffixes(*["same"] * 16)
    with pytest.raises(FileExistsError):
        write_atomic(target, b"new", suffix=suffix)
    assert len(used) == 16
    assert target.read_bytes() == b"old"


def test_a_failed_rename_leaves_the_old_state_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir()  # os.replace of a file over a directory fails after the data is written
    (target / "inside").write_bytes(b"kept")
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert (target / "inside").read_bytes() == b"kept"
    assert _leftovers(tmp_path) == []


def test_a_write_that_fails_half_way_leaves_the_old_file_whole(tmp_path: Path) -> None:
    # A real short write: the file size limit (RLIMIT_FSIZE) makes write(2) fail with
    # EFBIG after 4096 bytes, in a child process so the limit stays there.
    target = tmp_path / "registration.json"
    target.write_bytes(b"old record")
    code = (
        "import resource, signal, sys\n"
        "from gateway.core.files import write_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    write_atomic(sys.argv[1], b'x' * 100000)\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
        "    sys.exit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert target.read_bytes() == b"old record"
    assert _leftovers(tmp_path) == []


def test_concurrent_writers_never_expose_half_a_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    contents = [bytes([65 + i]) * 50_000 for i in range(4)]
    write_atomic(target, contents[0])
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(target.read_bytes())

    def write(data: bytes) -> None:
        for _ in range(20):
            write_atomic(target, data)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(c,)) for c in contents]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert seen <= set(contents)
    assert _leftovers(tmp_path) == []


# --- the writers that use it -----------------------------------------------------------------


def test_the_challenge_keys_file_is_a_secret_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "challenge-keys"
    write_new_keys_file(path, keep_existing=False)
    write_new_keys_file(path)
    assert len(load_keys_file(path)) == 2
    assert _mode(path) == 0o600
    # The fixed ".tmp" name of the old writer is not used: a file planted there is ignored.
    (tmp_path / "challenge-keys.tmp").symlink_to(tmp_path / "elsewhere")
    write_new_keys_file(path)
    assert not (tmp_path / "elsewhere").exists()
    assert _leftovers(tmp_path) == ["challenge-keys.tmp"]


def test_pem_files_are_written_key_private_and_certificate_public(tmp_path: Path) -> None:
    cert, key = write_pem_files(generate_ca("Test CA"), tmp_path / "new-dir", "ca")
    assert (_mode(key), _mode(cert)) == (0o600, 0o644)
    assert _leftovers(tmp_path / "new-dir") == []


def test_the_agents_files_are_private_and_failures_have_its_code(tmp_path: Path) -> None:
    write_private_file(tmp_path / "tls.crt", b"cert")
    assert _mode(tmp_path / "tls.crt") == 0o600
    with pytest.raises(AgentError) as err:
        write_private_file(tmp_path / "missing-dir" / "tls.crt", b"cert")
    assert err.value.code == "write_failed"


def test_a_symlink_is_switched_in_one_rename_and_a_taken_name_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "current"
    replace_symlink(link, "a")
    assert os.readlink(link) == "a"
    (tmp_path / ".current.taken.tmp").symlink_to("elsewhere")
    suffix, used = _suffixes("taken", "free")
    replace_symlink(link, "b", suffix=suffix)
    assert used == ["taken", "free"]
    assert os.readlink(link) == "b"
    assert os.readlink(tmp_path / ".current.taken.tmp") == "elsewhere"
    fsync_directory(tmp_path)
    assert _leftovers(tmp_path) == [".current.taken.tmp"]
