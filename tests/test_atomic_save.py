"""Saves are atomic: a save killed or failing at any moment leaves the previous file whole and no
temporary file behind; the written file's permissions follow the umask (or the file it replaces), a
symlink at the path stays a link, and errors name the user's path."""
import contextlib
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peft_ops
from peft_ops.files import TEMP_SUFFIX, temp_path, write_atomically
from peft_ops.peft_format import CONFIG_NAME, WEIGHTS_NAME
from utils import TinyModel, randomize_adapters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "0123456789abcdef"  # a temp file's random part: 16 hex digits
KILLS = 20
MAX_KILL_DELAY_S = 0.3


def _adapted(seed=1):
    model = TinyModel(seed)
    peft_ops.inject(model, "lora", 4, target_modules="all-linear")
    randomize_adapters(model, 0.2)
    return model


def _contents(path) -> tuple[dict, dict[str, list]]:
    """A safetensors file's metadata and tensors (a damaged file raises); comparable with ==, unlike its
    bytes (safetensors writes the metadata in no fixed order)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}


def big_lora_model() -> nn.Module:
    """A 16 MB LoRA adapter (4096×4096 base, rank 512): a save takes long enough to be killed inside."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096))
    peft_ops.inject(model, "lora", 512, target_modules=["0"])
    return model


# Imports peft_ops and builds the model once; then, per line read ("<value> <mode>"), forks a child that
# saves in a loop, prints its pid and, once the test killed it, its exit code. Mode "save_adapter": each
# save with lora_B filled with the next number after <value>. Mode "write_atomically": the bytes of one
# such save (made in another folder) written again and again, so that most kills land mid-write.
SAVE_SERVER = """
import os, sys, traceback
import torch
torch.set_num_threads(1)  # a forked child must not inherit a started OpenMP pool
import peft_ops
from peft_ops.files import write_atomically
from test_atomic_save import big_lora_model
path, side_path = sys.argv[1:]
model = big_lora_model()
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            value, mode = line.split()
            value = int(value)
            if mode == "write_atomically":
                with torch.no_grad():
                    model[0].lora_B.fill_(value + 1)
                peft_ops.save_adapter(model, side_path)
                with open(side_path, "rb") as f:
                    data = f.read()
                while True:
                    write_atomically(path, data)
            while True:
                value += 1
                with torch.no_grad():
                    model[0].lora_B.fill_(value)
                peft_ops.save_adapter(model, path)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def _temps(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name != "adapter.safetensors"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the save server forks its savers")
def test_save_killed_at_random_moments_keeps_the_previous_file(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "adapter.safetensors"
    model = big_lora_model()
    peft_ops.save_adapter(model, path)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "TRITON_INTERPRET": "1", "PEFT_OPS_AUTOTUNE": "0", "PYTHONPATH": os.path.join(ROOT, "tests")}
    server = subprocess.Popen([sys.executable, "-c", SAVE_SERVER, str(path), str(tmp_path / "side.safetensors")],
                              cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              start_new_session=True)  # its own process group: one killpg ends it and its savers
    # a hung server or saver must not hang the test: killing the group unblocks readline
    watchdog = threading.Timer(120, os.killpg, (server.pid, signal.SIGKILL))
    watchdog.start()
    rng = random.Random(0)
    last, killed_mid_write = 0.0, 0
    try:
        assert server.stdout.readline() == "ready\n"
        for kill in range(1, KILLS + 1):
            server.stdin.write(f"{kill * 1000} {('save_adapter', 'write_atomically')[kill % 2]}\n")
            server.stdin.flush()
            saver = int(server.stdout.readline())
            time.sleep(rng.uniform(0, MAX_KILL_DELAY_S))
            os.kill(saver, signal.SIGKILL)
            assert server.stdout.readline() == f"{-signal.SIGKILL}\n", "the saver died of something else"
            killed_mid_write += bool(_temps(folder))
            peft_ops.load_adapter(model, path)  # checks the file whole: size, checksum, every tensor
            value = float(model[0].lora_B[0, 0].detach())
            assert value >= last, "the file went back to an older save"
            last = value
            peft_ops.save_adapter(model, path)
            assert _temps(folder) == [], "a killed save's temporary file outlived the next save"
    finally:
        watchdog.cancel()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert last > 0, "no save completed in any round: the kills tested nothing"
    assert killed_mid_write > 0, "no kill landed while a temporary file existed: the kills tested nothing"


def test_new_file_permissions_follow_the_umask(tmp_path):
    model = _adapted()
    previous = os.umask(0o022)
    try:
        peft_ops.save_adapter(model, tmp_path / "a.safetensors")
        os.umask(0o077)
        peft_ops.save_adapter(model, tmp_path / "b.safetensors")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "b.safetensors").st_mode & 0o777 == 0o600


def test_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "a.safetensors"
    model = _adapted()
    peft_ops.save_adapter(model, path)
    os.chmod(path, 0o640)
    peft_ops.save_adapter(model, path)
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_save_through_a_symlink_writes_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "expected").mkdir()
    target = tmp_path / "real" / "adapter.safetensors"
    link = tmp_path / "adapter.safetensors"
    new = _adapted(seed=2)
    peft_ops.save_adapter(new, tmp_path / "expected" / "adapter.safetensors")
    peft_ops.save_adapter(_adapted(seed=1), target)
    link.symlink_to(target)
    peft_ops.save_adapter(new, link)
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    assert _contents(target) == _contents(tmp_path / "expected" / "adapter.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "expected", "real"]
    assert os.listdir(tmp_path / "real") == ["adapter.safetensors"]


@contextlib.contextmanager
def unwritable(path):
    """``path`` (a file or folder) made unwritable: read-only by mode or, as root (who ignores modes),
    immutable; the test is skipped where neither works."""
    mode = path.stat().st_mode & 0o777
    path.chmod(mode & 0o555)
    immutable = os.access(path, os.W_OK) and shutil.which("chattr") is not None and \
        subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if os.access(path, os.W_OK):
            pytest.skip("running as root without chattr: nothing can be made unwritable")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


def test_unwritable_folder_is_an_os_error_naming_the_path(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    path = folder / "adapter.safetensors"
    with unwritable(folder), pytest.raises(PermissionError) as raised:
        peft_ops.save_adapter(_adapted(), path)
    assert repr(str(path)) in str(raised.value)
    assert "/proc" not in str(raised.value) and TEMP_SUFFIX not in str(raised.value)
    assert os.listdir(folder) == []


def test_read_only_file_is_refused_as_a_plain_write_would_refuse_it(tmp_path):
    path = tmp_path / "adapter.safetensors"
    peft_ops.save_adapter(_adapted(seed=1), path)
    before = path.read_bytes()
    with unwritable(path), pytest.raises(PermissionError, match="read-only"):
        peft_ops.save_adapter(_adapted(seed=2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_missing_folder_or_a_directory_is_an_os_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "adapter.safetensors"
    expected = re.escape(f"cannot write {str(missing)!r}: the folder {str(missing.parent)!r} does not exist")
    with pytest.raises(FileNotFoundError, match=expected):
        write_atomically(missing, b"data")
    with pytest.raises(IsADirectoryError, match=re.escape(f"cannot write {str(tmp_path)!r}: it is a directory")):
        write_atomically(tmp_path, b"data")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failure_mid_write_keeps_the_previous_file(failing, tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    peft_ops.save_adapter(_adapted(seed=1), path)
    before = path.read_bytes()

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, failing, disk_full)
    with pytest.raises(OSError) as raised:
        peft_ops.save_adapter(_adapted(seed=2), path)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and repr(str(path)) in str(raised.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_interrupt_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    peft_ops.save_adapter(_adapted(seed=1), path)
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        peft_ops.save_adapter(_adapted(seed=2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_stale_temps_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    path = str(tmp_path / "adapter.safetensors")
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = temp_path(path, dead.pid, TOKEN)
        in_progress = temp_path(path, live.pid, TOKEN)
        other_target = temp_path(str(tmp_path / "adapter.safetensors.1"), dead.pid, TOKEN)
        for temp in (stale, in_progress, other_target):
            with open(temp, "wb") as f:
                f.write(b"partial")
        peft_ops.save_adapter(_adapted(), path)
        assert not os.path.exists(stale)
        assert os.path.exists(in_progress), "a live process's temporary file was removed"
        assert os.path.exists(other_target), "another file's temporary file was removed"
        assert sorted(n for n in os.listdir(tmp_path) if n.endswith(TEMP_SUFFIX)) == \
            sorted(os.path.basename(p) for p in (in_progress, other_target))
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("failing_file", [WEIGHTS_NAME, CONFIG_NAME])
def test_export_peft_failing_replace_keeps_the_previous_files(failing_file, tmp_path, monkeypatch):
    directory, expected = tmp_path / "adapter", tmp_path / "expected"
    peft_ops.export_peft(_adapted(seed=1), directory, base_model_name_or_path="first")
    peft_ops.export_peft(_adapted(seed=2), expected, base_model_name_or_path="second")
    before = {name: (directory / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}
    replace = os.replace

    def replace_failing_for_one_file(source, destination):
        if os.path.basename(destination) == failing_file:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_for_one_file)
    with pytest.raises(OSError, match=failing_file):
        peft_ops.export_peft(_adapted(seed=2), directory, base_model_name_or_path="second")
    monkeypatch.undo()
    assert sorted(os.listdir(directory)) == sorted(before), "a temporary file was left"
    assert (directory / failing_file).read_bytes() == before[failing_file]
    if failing_file == CONFIG_NAME:  # the weights, written first, are the new ones, whole
        assert _contents(directory / WEIGHTS_NAME) == _contents(expected / WEIGHTS_NAME)
    else:
        assert (directory / CONFIG_NAME).read_bytes() == before[CONFIG_NAME]
