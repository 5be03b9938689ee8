"""`resnet-fast train` stopped by real signals in real subprocesses: SIGTERM/SIGINT finish the step,
save last.pt at that exact position and exit 143/130; a second signal exits at once; --save-every.

No sleeps that race: one training image is a FIFO, so the run blocks inside a known step until the
test has sent its signals and then writes the image. The step in flight is then known exactly. The
tests that need a handler to run while the step is held (the debounce and the second signal) hold it
in Python instead (a sitecustomize hook around torchvision's image loader): Python runs a signal's
handler only between bytecodes, which a read blocked on a FIFO may never reach (the signal can land
on another thread), and they time the second signal from the first handler's line on stderr.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_checkpoint import _assert_same_state, _load, _metrics
from train_data import FAST, one_thread, train, write_image_tree  # noqa: F401 (one_thread: autouse)

from resnet_fast.train import checkpoint, data, stop

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"c{i}" for i in range(8)]
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs and signals")


def _image_folder(root: Path, per_class: int) -> Path:
    write_image_tree(root / "train", CLASSES, per_class, ("png",), size=(20, 20))
    write_image_tree(root / "val", CLASSES, 1, ("png",), size=(20, 20), seed=1)
    return root


def _image_at_step(root: Path, step: int, per_rank_batch: int, world_size: int = 1, rank: int = 0) -> Path:
    """The image that `rank` reads first in `step` (1-based) of epoch 1."""
    train_set = data.load_splits(str(root), 16, 320).train
    sampler = data.ResumableSampler(train_set, world_size, rank, seed=0)
    sampler.start_epoch(0)
    index = list(sampler)[(step - 1) * per_rank_batch]
    return Path(train_set.samples[index][0])


def _block_at_step(root: Path, step: int, per_rank_batch: int, world_size: int = 1, rank: int = 0):
    """Turn the image that `rank` reads first in `step` (1-based) of epoch 1 into a FIFO.
    Returns (the FIFO, the image's bytes)."""
    path = _image_at_step(root, step, per_rank_batch, world_size, rank)
    content = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    return path, content


def _start(argv: list, tmp_path: Path, torchrun: int = 0, **env_extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_extra}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] if torchrun else []
    cmd = [sys.executable, *launcher, "-m", "resnet_fast.train", *map(str, argv)]
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    return subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=tmp_path)


def _outputs(tmp_path: Path) -> tuple[str, str]:
    return (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()


def _open_writer(fifo: Path, proc: subprocess.Popen, tmp_path: Path, timeout: float = 120) -> int:
    """Open the FIFO for writing once the run has opened it for reading (it is then inside the step)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        assert proc.poll() is None, "the run ended before reaching the blocked step:\n" + "\n".join(_outputs(tmp_path))
        assert time.monotonic() < deadline, "the run never reached the blocked step"
        time.sleep(0.01)


def _finish_step(fd: int, content: bytes) -> None:
    os.set_blocking(fd, True)
    os.write(fd, content)
    os.close(fd)


def _wait(proc: subprocess.Popen, tmp_path: Path) -> tuple[int, str, str]:
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not exit within 300 s:\n" + "\n".join(_outputs(tmp_path)))
    return (rc, *_outputs(tmp_path))


def test_sigterm_mid_epoch_saves_that_step_and_resumes_bitwise(capsys, tmp_path):
    """SIGTERM (twice at once, as a scheduler's reaches torchrun's workers directly and forwarded) while step 3 of
    8 runs: the run finishes step 3, saves it, says so in one line and exits 143; resuming gives
    bitwise the weights, optimizer, schedule and metrics of a run that was never stopped."""
    flags = [*FAST, "--batch-size", "8", "--epochs", "2"]
    root = _image_folder(tmp_path / "data", per_class=8)  # 64 images: 8 steps per epoch
    shutil.copytree(root, tmp_path / "data_copy")
    fifo, content = _block_at_step(root, step=3, per_rank_batch=8)
    out = tmp_path / "run"
    proc = _start([*flags, "--data", root, "--output-dir", out], tmp_path)
    fd = _open_writer(fifo, proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # within the debounce window: the same request
    _finish_step(fd, content)
    rc, stdout, stderr = _wait(proc, tmp_path)

    assert rc == 143, stdout + stderr
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped")]
    assert stopped == [f"stopped by SIGTERM after step 3 (epoch 1, batch 3/8); {out / 'last.pt'} holds this "
                       f"position. Resume with: resnet-fast train --resume {out / 'last.pt'}"], stdout
    assert "SIGTERM received: stopping after this step" in stderr and "Traceback" not in stderr
    assert "epoch 1/2:" not in stdout  # no validation after the signal
    saved = _load(out / "last.pt")
    assert (saved["progress"]["epoch"], saved["progress"]["batch"], saved["progress"]["global_step"]) == (0, 3, 3)
    assert saved["scheduler"]["last_epoch"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]  # no temp files, no metrics of a cut epoch

    fifo.unlink()
    fifo.write_bytes(content)
    rc, stdout, err = train(capsys, "--resume", out / "last.pt")
    assert rc == 0, err
    assert "batch 3/8, step 3" in stdout
    rc, _, err = train(capsys, *flags, "--data", tmp_path / "data_copy", "--output-dir", tmp_path / "straight")
    assert rc == 0, err
    _assert_same_state(_load(tmp_path / "straight" / "last.pt"), _load(out / "last.pt"))
    for a, b in zip(_metrics(tmp_path / "straight" / "metrics.csv"), _metrics(out / "metrics.csv"), strict=True):
        assert (a["epoch"], a["train_loss"], a["val_loss"], a["val_top1"]) == \
               (b["epoch"], b["train_loss"], b["val_loss"], b["val_top1"])


_HOLD_HOOK = """\
import os, time
import torchvision.datasets.folder as folder

_hold, _load = os.environ["RESNET_FAST_TEST_HOLD"], folder.pil_loader


def pil_loader(path):
    if path == _hold and not os.path.exists(_hold + ".release"):
        open(_hold + ".reached", "w").close()
        while not os.path.exists(_hold + ".release"):
            time.sleep(0.005)  # Python bytecode between sleeps: the run's signal handlers run here
    return _load(path)


folder.pil_loader = pil_loader  # default_loader looks it up on every call
"""


def _until(condition, proc: subprocess.Popen, tmp_path: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n" + "\n".join(_outputs(tmp_path))
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _start_held(root: Path, step: int, argv: list, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """Start a run on `root` that holds (in Python, see _HOLD_HOOK) at the first image of `step`;
    returns once it is held there, with the process and that image."""
    image = _image_at_step(root, step=step, per_rank_batch=8)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOLD_HOOK)
    proc = _start([*argv, "--data", root], tmp_path, PYTHONPATH=f"{hook}{os.pathsep}{REPO}",
                  RESNET_FAST_TEST_HOLD=str(image))
    _until(Path(f"{image}.reached").exists, proc, tmp_path, f"step {step}")
    return proc, image


def test_a_second_signal_within_the_debounce_window_is_the_same_request(tmp_path):
    """The first SIGTERM's handler has run (its line is on stderr) when a second SIGTERM arrives, well
    inside DEBOUNCE_S: the run still finishes step 3, saves it and exits 143. Without the debounce the
    second signal would kill the run (status -15)."""
    root = _image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    proc, image = _start_held(root, 3, [*FAST, "--batch-size", "8", "--output-dir", out], tmp_path)
    first = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _until(lambda: "SIGTERM received" in _outputs(tmp_path)[1], proc, tmp_path, "the first signal's handler")
    proc.send_signal(signal.SIGTERM)
    gap = time.monotonic() - first
    Path(f"{image}.release").touch()
    rc, stdout, stderr = _wait(proc, tmp_path)

    if gap >= stop.DEBOUNCE_S:
        pytest.skip(f"the second signal went {gap:.2f} s after the first: outside the window under test")
    assert rc == 143, stdout + stderr
    assert stderr.count("SIGTERM received") == 1 and "second signal (" not in stderr, stderr
    assert [line for line in stdout.splitlines() if line.startswith("stopped")] == [
        f"stopped by SIGTERM after step 3 (epoch 1, batch 3/8); {out / 'last.pt'} holds this position. "
        f"Resume with: resnet-fast train --resume {out / 'last.pt'}"], stdout
    assert checkpoint.load(out / "last.pt")["progress"]["global_step"] == 3


def test_second_signal_exits_at_once_and_keeps_the_last_complete_save(tmp_path):
    """Step 4 is held in Python (the hook), so both handlers run as the signals arrive. The second
    SIGINT goes DEBOUNCE_S + 0.2 s after the first handler's line is on stderr, so it is a new
    request however late that handler ran: the run dies by SIGINT, last.pt stays the step-2 save."""
    root = _image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    proc, image = _start_held(root, 4, [*FAST, "--batch-size", "8", "--save-every", "2", "--output-dir", out],
                              tmp_path)  # held inside step 4: steps 1-3 done, step 2 saved
    proc.send_signal(signal.SIGINT)
    _until(lambda: "SIGINT received" in _outputs(tmp_path)[1], proc, tmp_path, "the first signal's handler")
    time.sleep(stop.DEBOUNCE_S + 0.2)
    proc.send_signal(signal.SIGINT)
    rc, stdout, stderr = _wait(proc, tmp_path)

    assert rc == -signal.SIGINT, stdout + stderr  # killed by the signal: status 130 in a shell
    assert "second signal (SIGINT): exiting at once" in stderr and "Traceback" not in stderr
    assert not any(line.startswith("stopped") for line in stdout.splitlines())
    saved = checkpoint.load(out / "last.pt")
    assert (saved["progress"]["batch"], saved["progress"]["global_step"]) == (2, 2)
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]


def test_save_every_writes_exact_mid_epoch_checkpoints(capsys, tmp_path, monkeypatch):
    """Every --save-every checkpoint resumes to bitwise the weights of the run that wrote it."""
    saves = []
    real_save = checkpoint.save

    def recording_save(path, payload):
        real_save(path, payload)
        saves.append((path.name, payload["progress"]["global_step"], path.read_bytes()))

    monkeypatch.setattr(checkpoint, "save", recording_save)
    flags = [*FAST, "--optimizer", "adam", "--epochs", "2"]  # 16 steps per epoch
    rc, _, err = train(capsys, *flags, "--save-every", "5", "--output-dir", tmp_path / "straight")
    assert rc == 0, err
    last_saves = {step: blob for name, step, blob in saves if name == "last.pt"}
    assert list(last_saves) == [5, 10, 15, 16, 20, 25, 30, 32]  # 16 and 32: the epochs' ends

    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "last.pt").write_bytes(last_saves[20])
    assert _load(tmp_path / "split" / "last.pt")["progress"]["batch"] == 4  # epoch 2, mid-way
    rc, _, err = train(capsys, "--resume", tmp_path / "split" / "last.pt")
    assert rc == 0, err
    _assert_same_state(_load(tmp_path / "straight" / "last.pt"), _load(tmp_path / "split" / "last.pt"))


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds rank 1 through /proc")
def test_torchrun_ranks_stop_after_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone, while rank 0 is inside step 3: the ranks agree at the next sync
    point (step 10 of 16) and stop there together; rank 0 saves that step."""
    from resnet_fast.train.loop import SYNC_EVERY
    root = _image_folder(tmp_path / "data", per_class=16)  # 128 images, global batch 8: 16 steps
    fifo, content = _block_at_step(root, step=3, per_rank_batch=4, world_size=2, rank=0)
    out = tmp_path / "run"
    proc = _start([*FAST, "--arch", "cnn_nobn", "--batch-size", "8", "--data", root, "--output-dir", out],
                  tmp_path, torchrun=2)
    fd = _open_writer(fifo, proc, tmp_path)
    rank1 = [pid for pid in _children(proc.pid) if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)
    _finish_step(fd, content)
    rc, stdout, stderr = _wait(proc, tmp_path)

    # torchrun's failure report: one "rank : R ... exitcode : 143" entry per worker
    exits = re.findall(r"^\s*rank\s*:\s*(\d+).*\n\s*exitcode\s*:\s*(-?\d+)", stderr, re.MULTILINE)
    assert rc != 0 and sorted(exits) == [("0", "143"), ("1", "143")], stderr
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped")]
    assert len(stopped) == 1 and stopped[0].startswith(
        f"stopped by SIGTERM after step {SYNC_EVERY} (epoch 1, batch {SYNC_EVERY}/16)"), stdout + stderr
    assert "torchrun <your launch flags> -m resnet_fast train --resume" in stopped[0]
    saved = checkpoint.load(out / "last.pt")
    assert saved["progress"]["global_step"] == SYNC_EVERY and saved["progress"]["batch"] == SYNC_EVERY


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("when", ["last_batch", "validation"])
def test_stops_at_an_epoch_end_resume_exactly(capsys, tmp_path, monkeypatch, when):
    """A signal in the epoch's last step saves before validation (the resumed run validates);
    one during validation stops at the epoch boundary. (The flag is set directly here: the
    real signals are above.)"""
    from resnet_fast.train.loop import Trainer
    flags = [*FAST, "--epochs", "2"]  # 16 steps per epoch
    rc, _, err = train(capsys, *flags, "--output-dir", tmp_path / "straight")
    assert rc == 0, err

    hooked, real = ("_step", Trainer._step) if when == "last_batch" else ("_evaluate", Trainer._evaluate)

    def signal_during(self, *args):
        if self.progress["global_step"] == 15 + (when == "validation"):
            self.stop.signum = signal.SIGTERM
        return real(self, *args)

    monkeypatch.setattr(Trainer, hooked, signal_during)
    rc, out, err = train(capsys, *flags, "--output-dir", tmp_path / "split")
    assert rc == 143, err
    expected = "after step 16 (epoch 1, batch 16/16)" if when == "last_batch" else "at the end of epoch 1 (step 16)"
    assert f"stopped by SIGTERM {expected}" in out
    assert ("epoch 1/2:" in out) == (when == "validation")
    monkeypatch.undo()
    rc, out, err = train(capsys, "--resume", tmp_path / "split" / "last.pt")
    assert rc == 0, err
    _assert_same_state(_load(tmp_path / "straight" / "last.pt"), _load(tmp_path / "split" / "last.pt"))
    assert [(r["train_loss"], r["val_loss"]) for r in _metrics(tmp_path / "straight" / "metrics.csv")] == \
        [(r["train_loss"], r["val_loss"]) for r in _metrics(tmp_path / "split" / "metrics.csv")]
