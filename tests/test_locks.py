"""Run-folder locks: one process per run folder; stale locks of dead processes are taken over; two sweeps over
the same runs folder run every spec exactly once."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from promptclip.locks import LOCK_FILE, RunBusy, RunLock, pid_is_running, run_lock, this_process
from promptclip.recipes import resolve_recipe

RECIPE = resolve_recipe("smoke/coop")


def write_lock(run_dir: Path, **changes: object) -> Path:
    """A lock file as another process would have written it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = replace(this_process(), **changes)  # type: ignore[arg-type]
    path = run_dir / LOCK_FILE
    path.write_text(owner.to_json())
    return path


@pytest.fixture
def sleeper():
    """A live process that is not this one. It sleeps far longer than any test takes, even on a loaded machine
    (a sleeper that exits mid-test would make its lock stale); the fixture ends it."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    yield process
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not pid_is_running(process.pid)
    return process.pid


def test_a_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire()
    content = json.loads((tmp_path / LOCK_FILE).read_text())
    assert content["pid"] == os.getpid() and content["host"] and content["started"] <= time.time()
    assert not second.acquire()  # this process is alive: its own lock is not stale
    assert second.holder is not None and second.holder.pid == os.getpid()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert second.acquire()
    second.release()


def test_a_live_owner_keeps_the_folder_and_is_named(tmp_path: Path, sleeper) -> None:
    from promptclip.locks import process_start_ticks

    write_lock(tmp_path, pid=sleeper.pid, process_start=process_start_ticks(sleeper.pid))
    lock = RunLock(tmp_path)
    assert not lock.acquire()
    message = lock.busy_message()
    assert f"in use by pid {sleeper.pid} on " in message
    assert f"delete {tmp_path / LOCK_FILE} and run again with --resume" in message
    with pytest.raises(RunBusy, match=f"pid {sleeper.pid}"), run_lock(tmp_path):
        pass
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == sleeper.pid  # untouched


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    pid = dead_pid()
    write_lock(tmp_path, pid=pid, process_start=None)
    lock = RunLock(tmp_path)
    assert lock.acquire()
    assert lock.took_over is not None and lock.took_over.pid == pid
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_or_a_reboot_makes_a_lock_stale(tmp_path: Path) -> None:
    me = this_process()
    if me.process_start is None or me.boot_id is None:
        pytest.skip("needs /proc (Linux)")
    write_lock(tmp_path / "reused", pid=os.getpid(), process_start=me.process_start - 1)
    assert RunLock(tmp_path / "reused").acquire()  # same pid, but a process that started earlier held it
    write_lock(tmp_path / "rebooted", pid=os.getpid(), boot_id="another-boot")
    assert RunLock(tmp_path / "rebooted").acquire()


def test_a_lock_from_another_host_is_respected(tmp_path: Path) -> None:
    write_lock(tmp_path, host="some-other-machine", pid=dead_pid())
    lock = RunLock(tmp_path)
    assert not lock.acquire()  # its processes cannot be seen from here
    assert "on some-other-machine" in lock.busy_message()


def test_an_unreadable_lock_is_busy_while_young_and_stale_when_old(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    path.write_text("")  # created, content not yet written
    assert not RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    lock = RunLock(tmp_path)
    assert lock.acquire()
    lock.release()


def test_a_take_over_never_removes_a_lock_taken_meanwhile(tmp_path: Path, sleeper) -> None:
    """Two processes judge the same lock stale; the first replaces it; the second must not remove the new one."""
    from promptclip.locks import LockOwner, process_start_ticks

    stale_path = write_lock(tmp_path, pid=dead_pid(), process_start=None)
    judged_stale = LockOwner.from_json(stale_path.read_text())
    fresh = write_lock(tmp_path, pid=sleeper.pid, process_start=process_start_ticks(sleeper.pid))
    fresh_text = fresh.read_text()
    late = RunLock(tmp_path)
    assert not late._remove_if_unchanged(judged_stale)  # what the slower process does next
    assert fresh.read_text() == fresh_text  # the new owner's lock is back in place
    assert not late.acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


# Generous for a handful of forked processes on a loaded machine; only a hang reaches it.
WORKER_TIMEOUT_S = 300


def _try_lock(folder: str, start, results, release) -> None:
    start.wait(WORKER_TIMEOUT_S)  # all try at once
    lock = RunLock(folder)
    results.put(lock.acquire())
    release.wait(WORKER_TIMEOUT_S)  # the winner holds the lock until every process has tried, however slow


def test_exactly_one_of_many_processes_takes_a_stale_lock(tmp_path: Path) -> None:
    write_lock(tmp_path, pid=dead_pid(), process_start=None)
    context = multiprocessing.get_context("fork")
    results, start, release = context.Queue(), context.Barrier(6), context.Event()
    workers = [context.Process(target=_try_lock, args=(str(tmp_path), start, results, release)) for _ in range(6)]
    for worker in workers:
        worker.start()
    try:
        outcomes = [results.get(timeout=WORKER_TIMEOUT_S) for _ in workers]
    finally:
        release.set()
        for worker in workers:
            worker.join(timeout=WORKER_TIMEOUT_S)
    assert sorted(outcomes) == [False] * 5 + [True]


# ---------------------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------------------


def sweep_args(runs: Path, seeds: str, epochs: int) -> list[str]:
    return [
        "run",
        "few_shot",
        "--recipe",
        str(RECIPE),
        "--datasets",
        "synthetic_shapes",
        "--shots",
        "2",
        "--seeds",
        seeds,
        "--runs-dir",
        str(runs),
        "--quiet",
        "--opts",
        "optim.epochs",
        str(epochs),
    ]


def seed_folder(runs: Path, seed: int) -> Path:
    return runs / "few_shot" / "synthetic_shapes" / "coop" / "coop" / "shots2" / f"seed{seed}"


def test_a_sweep_skips_a_run_held_by_a_live_process_and_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    from promptclip.cli import main

    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))
    held = RunLock(seed_folder(tmp_path, 1))
    assert held.acquire()  # another sweep (this live process) is training seed 1
    try:
        assert main(sweep_args(tmp_path, "1,2", 1)) == 0
    finally:
        held.release()
    out = capsys.readouterr().out
    busy = f"[1/2] in progress elsewhere, skipped: {seed_folder(tmp_path, 1)} is in use by pid {os.getpid()} on "
    assert busy in out
    assert "1 runs finished, 0 skipped (done before), 1 left to another running sweep" in out
    assert not (seed_folder(tmp_path, 1) / "results.json").exists()
    assert (seed_folder(tmp_path, 2) / "results.json").is_file()
    assert not (seed_folder(tmp_path, 2) / LOCK_FILE).exists()

    assert main(sweep_args(tmp_path, "1,2", 1)) == 0  # the lock is gone: the next sweep picks it up
    assert "1 runs finished, 1 skipped (done before), 0 failed" in capsys.readouterr().out


def test_train_refuses_a_run_folder_in_use(tmp_path: Path, monkeypatch, capsys) -> None:
    from promptclip.cli import main

    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        code = main(["train", "--recipe", str(RECIPE), "--output", str(run_dir), "--quiet"])
    assert code == 2
    assert f"{run_dir} is in use by pid {os.getpid()}" in capsys.readouterr().err
    assert not (run_dir / "log.txt").exists()  # nothing was touched


def test_two_sweeps_over_the_same_runs_folder_run_each_spec_once(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PROMPTCLIP_CACHE": str(tmp_path / "cache")}
    env.pop("PROMPTCLIP_FAULT", None)
    command = [sys.executable, "-m", "promptclip.cli", *sweep_args(tmp_path, "1,2,3", 4)]
    sweeps = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"
    ]
    outputs = [sweep.communicate(timeout=300) for sweep in sweeps]
    for sweep, (_, err) in zip(sweeps, outputs, strict=True):
        assert sweep.returncode == 0, err
    for seed in (1, 2, 3):
        folder = seed_folder(tmp_path, seed)
        assert json.loads((folder / "results.json").read_text())["seed"] == seed
        headers = [line for line in (folder / "log.txt").read_text().splitlines() if line.startswith("== ")]
        assert len(headers) == 1, f"seed {seed} was run {len(headers)} times"
        assert not (folder / LOCK_FILE).exists()
    finished = [re.findall(r"finished (\S+) \(", out) for out, _ in outputs]
    assert sorted(finished[0] + finished[1]) == sorted(str(seed_folder(tmp_path, s)) for s in (1, 2, 3))
    texts = outputs[0][0] + outputs[1][0]
    assert "in progress elsewhere, skipped" in texts  # the sweeps met on a run and one left it to the other
