"""Faults a run survives, each made for real: a SIGKILL inside a checkpoint write, a full disk
during a save, a rank of a two-process torchrun run killed or hung."""
import errno
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import TINY, cli_command, subprocess_env, wait_for_marker
from densessl import cli
from densessl.common import checkpoint as ckpt_io
from densessl.common.checkpoint import CheckpointError, load_checkpoint
from densessl.common.metrics_jsonl import read_losses
from wrapped_file import WrappedFile

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's ranks in /proc")


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_losses(run_dir / "metrics.jsonl")}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = (load_checkpoint(r / "checkpoints" / "last.pt")["method"] for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------ SIGKILL inside a save

# `densessl ...` whose PAUSE_AT_SAVE-th write of last.pt stops part-way: the first 64 KiB of the
# temporary reach the disk, the temporary's path goes to PAUSE_MARKER, and the process sleeps
# inside the save until it is killed.
PAUSING_CLI = r'''
import os, sys, time
from pathlib import Path

from densessl import cli
from densessl.common import checkpoint as ckpt_io

sys.path.insert(0, os.environ["WRAPPED_FILE_DIR"])
from wrapped_file import WrappedFile

pause_at, marker = int(os.environ["PAUSE_AT_SAVE"]), Path(os.environ["PAUSE_MARKER"])
saves = 0


class PausingFile(WrappedFile):
    def write(self, data):
        n = super().write(data)
        if self.written >= 64 * 1024:
            self.f.flush()
            os.fsync(self.f.fileno())
            # tmp + rename: the test polls for the marker and must never read it empty
            marker.with_suffix(".tmp").write_text(self.f.name)
            os.replace(marker.with_suffix(".tmp"), marker)
            time.sleep(600)
        return n


def pausing_open(path, mode="r", *args, **kwargs):
    global saves
    f = open(path, mode, *args, **kwargs)
    if "w" in mode and "last.pt" in Path(path).name:
        saves += 1
        if saves == pause_at:
            return PausingFile(f)
    return f


ckpt_io.open = pausing_open
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_keeps_last_and_the_rerun_resumes_exactly(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ckpts, env = killed / "checkpoints", subprocess_env()
    script, marker = tmp_path / "pausing_cli.py", tmp_path / "paused"
    script.write_text(PAUSING_CLI)
    with open(tmp_path / "ref.log", "w") as log:  # the uninterrupted run, beside the killed one
        ref_proc = subprocess.Popen(cli_command("pretrain", "byol-scenes", *TINY, f"run_dir={ref}"), env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
    # 8 steps, last.pt every 2: the second write (step 4) pauses; the one before is at step 2, mid-epoch
    proc = subprocess.Popen([sys.executable, str(script), "pretrain", "byol-scenes", *TINY, f"run_dir={killed}"],
                            env={**env, "PAUSE_AT_SAVE": "2", "PAUSE_MARKER": str(marker),
                                 "WRAPPED_FILE_DIR": str(Path(__file__).parent)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_marker(proc, marker, 180), "the run never paused inside its second write of last.pt"
        tmp = Path(marker.read_text())
        assert tmp.parent == ckpts and tmp.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load_checkpoint(ckpts / "last.pt")["step"] == 2  # the previous checkpoint, whole
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp)  # what the kill cut: a partial file, never under the name last.pt
    res = subprocess.run(cli_command("pretrain", "byol-scenes", *TINY, f"run_dir={killed}"), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"removed {tmp}: a partial checkpoint" in res.stdout
    assert f"resuming from {ckpts / 'last.pt'} at step 2/8" in res.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]  # no temporary left behind
    assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert load_checkpoint(ckpts / "last.pt")["step"] == 8
    assert_same_weights(ref, killed)
    assert losses(ref) == losses(killed) and sorted(losses(ref)) == list(range(1, 9))


# ------------------------------------------------------------------ no space left on the device


@pytest.mark.parametrize("where", ["write", "flush"])
def test_full_disk_during_a_save_gives_one_error_line_and_keeps_the_last_checkpoint(where, tmp_path, capsys,
                                                                                    monkeypatch):
    """The device fills during the second write of last.pt (step 4): inside torch.save (which then
    raises its own RuntimeError over the OSError, as on a real full tmpfs) or when the buffered
    tail is flushed."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    real_open, saves, before = open, [], {}

    class FullDevice(WrappedFile):
        def write(self, data):
            if where == "write" and self.written >= 64 * 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

        def flush(self):
            if where == "flush":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.f.flush()

    def filling_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and "last.pt" in Path(path).name:
            saves.append(path)
            if len(saves) == 2:
                before["bytes"] = last.read_bytes()
                return FullDevice(f)
        return f

    monkeypatch.setattr(ckpt_io, "open", filling_open, raising=False)
    rc = cli.main(["pretrain", "byol-scenes", *TINY, f"run_dir={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(saves) == 2
    errors = [line for line in err.splitlines() if line.startswith("densessl: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"cannot write checkpoint {last}: the device is full" in errors[0]
    assert last.read_bytes() == before["bytes"] and load_checkpoint(last)["step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # the temporary is gone


# ------------------------------------------------------------------ a rank lost under torchrun


def rank_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes that the torchrun agent `agent_pid` started."""
    ranks = {}
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent_pid:
                continue
            env = dict(x.split("=", 1) for x in (d / "environ").read_bytes().decode().split("\0") if "=" in x)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(d.name)
    return ranks


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
            "-m", "densessl.cli", "pretrain", "byol-scenes", *args]


@contextmanager
def started(cmd: list[str], log: Path):
    """Popen in its own process group; whatever is left of it is killed on the way out."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_checkpoint(proc, last: Path, step: int) -> int:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and (s := load_checkpoint(last)["step"]) >= step:
            return s
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step >= {step} in time (torchrun exit {proc.poll()})")


# a rank's clear end: one line, whichever comes first, gloo's error or torchrun's SIGTERM
RANK0_LINE = re.compile(r"^densessl: error: rank 0: (lost contact with another rank|stopped by SIGTERM)", re.M)
TRACEBACK_IN_DENSESSL = re.compile(r'File ".*densessl/')  # a rank's traceback (torchrun's own one aside)


@needs_proc
@pytest.mark.slow
def test_a_killed_rank_ends_the_other_with_a_clear_message_and_the_rerun_resumes_exactly(tmp_path):
    args = TINY  # 8 steps, last.pt every 2
    ref, run = tmp_path / "ref", tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    with started(torchrun(*args, f"run_dir={ref}"), tmp_path / "ref.log") as ref_proc, \
         started(torchrun(*args, f"run_dir={run}"), tmp_path / "run.log") as proc:
        wait_for_checkpoint(proc, last, 2)
        os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=60)
        took = time.time() - killed_at
        assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    out = (tmp_path / "run.log").read_text()
    assert proc.returncode != 0 and took < 30, (took, out[-3000:])
    assert RANK0_LINE.search(out) and not TRACEBACK_IN_DENSESSL.search(out), out[-5000:]
    step = load_checkpoint(last)["step"]
    assert 2 <= step < 8, "the kill must land mid-run"
    res = subprocess.run(torchrun(*args, f"run_dir={run}"), env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {last} at step {step}/8" in res.stdout
    assert load_checkpoint(last)["step"] == 8
    assert_same_weights(ref, run)
    assert losses(ref) == losses(run) and sorted(losses(run)) == list(range(1, 9))


@needs_proc
@pytest.mark.slow
def test_a_hung_rank_times_the_other_out_with_a_clear_message(tmp_path):
    """A rank that stops answering (SIGSTOP: a hung host) without dying: torchrun sees nothing,
    the other rank's collective times out after train.dist_timeout_s (torch's default: 30 min)."""
    run = tmp_path / "run"
    # 8 s: short, yet above the skew between two ranks' steps on a loaded 2-core machine
    with started(torchrun(*TINY, "train.dist_timeout_s=8", f"run_dir={run}"),
                 tmp_path / "run.log") as proc:
        wait_for_checkpoint(proc, run / "checkpoints" / "last.pt", 2)
        pids = rank_pids(proc.pid)
        os.kill(pids[1], signal.SIGSTOP)
        stopped_at = time.time()
        while alive(pids[0]) and time.time() - stopped_at < 60:
            time.sleep(0.05)
        took = time.time() - stopped_at
        os.kill(pids[1], signal.SIGKILL)  # what the operator does with a hung rank
        proc.wait(timeout=60)
    out = (tmp_path / "run.log").read_text()
    assert took < 30, f"rank 0 still waiting {took:.0f} s after rank 1 hung"
    assert re.search(r"^densessl: error: rank 0: lost contact with another rank \(Timed out", out, re.M), out[-5000:]
    assert not TRACEBACK_IN_DENSESSL.search(out), out[-5000:]
