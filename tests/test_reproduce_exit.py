"""`reproduce` under torchrun: every rank writes what it owes, no rank is left waiting or killed,
and every rank exits with the one status that the ranks agreed on (docs/reproduce.md)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT
from test_reproduce import _free_port, make_folder, tiny_lab

from sanet_viz.cli.reproduce import CRASHED, DONE, FAILED, UNDECODABLE, exit_status

STATE = ["rank0000-of-0002.pt", "rank0001-of-0002.pt"]


def test_exit_status_of_each_outcome() -> None:
    assert [exit_status(o, 1) for o in (DONE, UNDECODABLE, FAILED, CRASHED)] == [0, 3, 2, 1]
    # torchrun takes any non-zero status of a worker as its failure: a complete run exits 0.
    assert [exit_status(o, 2) for o in (DONE, UNDECODABLE, FAILED, CRASHED)] == [0, 0, 2, 1]


# ---------------------------------------------------------------------------------------------
# Two gloo ranks through the command line (tiny models), one way of failing per scenario

def _fail_setup(rank: int) -> None:
    from sanet_viz.lab import Lab
    from sanet_viz.weights import WeightsError

    def load(cls: type, **kwargs: object) -> Lab:
        if rank == 1:
            raise WeightsError("rank 1 cannot read its weights (test)")
        return tiny_lab()

    Lab.load = classmethod(load)  # type: ignore[method-assign, assignment]


def _fail_mid_loop(rank: int) -> None:
    from sanet_viz.reproduce import engine

    real, calls = engine.evaluate_batch, []

    def evaluate(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if rank == 1 and len(calls) == 3:  # second batch, second model
            raise RuntimeError("rank 1 broke in the middle of its loop (test)")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    engine.evaluate_batch = evaluate  # type: ignore[assignment]


def _fail_writing(rank: int) -> None:
    import sanet_viz.reproduce as rp

    def write(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device (test)")

    rp.write_outputs = write  # type: ignore[assignment]


def _corrupt_state(rank: int, out: Path) -> None:
    if rank == 1:
        (out / "state").mkdir(parents=True, exist_ok=True)
        (out / "state" / STATE[1]).write_bytes(b"not a saved state")


SCENARIOS = ["undecodable", "setup", "mid_loop", "state", "writing"]


def _scenario_worker(rank: int, world: int, ports: list[int], folder: str, base: str) -> None:
    from sanet_viz import cli

    torch.set_num_threads(1)
    for name, port in zip(SCENARIOS, ports, strict=True):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        out = Path(base) / name
        log = Path(base) / f"{name}.rank{rank}.log"
        with _patched(name, rank, out), open(log, "w") as stream, contextlib.redirect_stderr(stream):
            status = cli.main(["reproduce", "--data", folder, "--out", str(out), "--workers", "0",
                               "--batch-size", "2", "--probe-batch-size", "16", "--precision", "fp32",
                               "--checkpoint-every", "1", "--no-progress", "--device", "cpu"])
        (Path(base) / f"{name}.rank{rank}.status").write_text(str(status))


@contextlib.contextmanager
def _patched(name: str, rank: int, out: Path) -> Iterator[None]:
    """Tiny models instead of the full-size ones, and the scenario's failure on its rank."""
    import sanet_viz.reproduce as rp
    from sanet_viz.lab import Lab
    from sanet_viz.reproduce import engine

    saved = Lab.__dict__["load"], engine.evaluate_batch, rp.write_outputs
    Lab.load = classmethod(lambda cls, **kwargs: tiny_lab())  # type: ignore[method-assign, assignment]
    {"setup": lambda: _fail_setup(rank), "mid_loop": lambda: _fail_mid_loop(rank),
     "writing": lambda: _fail_writing(rank), "state": lambda: _corrupt_state(rank, out)}.get(name, lambda: None)()
    try:
        yield
    finally:
        Lab.load, engine.evaluate_batch, rp.write_outputs = saved  # type: ignore[method-assign]


def _run_ranks(target: Callable[..., None], args: tuple[object, ...], timeout: float) -> None:
    """Spawn two ranks; fail (and kill them) if they have not both ended within ``timeout``."""
    context = mp.spawn(target, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not end within {timeout:.0f} s: one waits in a collective")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("exit")
    folder = make_folder(base / "data")  # 9 pictures and one broken file
    _run_ranks(_scenario_worker, (2, [_free_port() for _ in SCENARIOS], str(folder), str(base)), timeout=300)
    return base


def _outcome(base: Path, name: str) -> tuple[list[int], list[str]]:
    return ([int((base / f"{name}.rank{r}.status").read_text()) for r in (0, 1)],
            [(base / f"{name}.rank{r}.log").read_text() for r in (0, 1)])


@pytest.mark.slow
def test_undecodable_files_every_rank_writes_then_all_exit_zero(scenarios: Path) -> None:
    statuses, logs = _outcome(scenarios, "undecodable")
    assert statuses == [0, 0], logs
    summary = json.loads((scenarios / "undecodable" / "summary.json").read_text())
    assert summary["images"] == 9 and summary["decode_errors"] == 1 and summary["pretrained"] is False
    assert sorted(p.name for p in (scenarios / "undecodable" / "state").iterdir()) == STATE
    assert "could not be decoded" in logs[0] and "exit status is 0 under torchrun" in logs[0]
    assert "error" not in logs[1].lower(), logs[1]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "status", "failing_says"), [
    ("setup", 2, "rank 1: rank 1 cannot read its weights"),
    ("mid_loop", 1, "rank 1 broke in the middle of its loop"),
    ("state", 2, "unreadable saved state"),
])
def test_one_rank_fails_every_rank_exits_with_its_status(scenarios: Path, name: str, status: int,
                                                         failing_says: str) -> None:
    statuses, logs = _outcome(scenarios, name)
    assert statuses == [status, status], logs
    assert failing_says in logs[1], logs[1]
    assert "another rank failed" in logs[0], logs[0]  # rank 0 stopped at an agreement point, not killed
    assert not (scenarios / name / "summary.json").exists()


@pytest.mark.slow
def test_rank_zero_fails_writing_and_the_others_wait_for_it(scenarios: Path) -> None:
    statuses, logs = _outcome(scenarios, "writing")
    assert statuses == [1, 1], logs
    assert "No space left on device" in logs[0] and "rank 0 failed" in logs[0], logs[0]
    assert "error" not in logs[1].lower(), logs[1]  # rank 1 had done its part and waited for the verdict
    assert sorted(p.name for p in (scenarios / "writing" / "state").iterdir()) == STATE


# ---------------------------------------------------------------------------------------------
# The real launcher, full-size untrained models

@pytest.mark.slow
def test_torchrun_with_a_corrupt_file_succeeds_and_writes_everything(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "SANET_VIZ_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "sanet_viz",
           "reproduce", "--data", str(data), "--out", str(out), "--resnet50", "untrained", "--sanet50", "untrained",
           "--no-probe", "--no-progress", "--workers", "0", "--batch-size", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    for sign in ("FAILED", "SIGTERM", "ChildFailedError", "Traceback"):
        assert sign not in output, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 9 and summary["decode_errors"] == 1 and summary["device"]["processes"] == 2
    assert sorted(p.name for p in (out / "state").iterdir()) == STATE
    assert "exit status is 0 under torchrun" in output
