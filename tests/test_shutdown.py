"""SIGTERM: the app exits 0 within its grace, running requests finish or are cancelled, and the
log has no abort and no traceback (sanet_viz/server/shutdown.py)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EXAMPLES, load_test_module

from sanet_viz import progress
from sanet_viz.server import shutdown

lt = load_test_module()


class _Left(Exception):
    """Raised instead of os._exit, so that the test sees how the process would have left."""


class _Stop(shutdown.GracefulStop):
    def _leave(self, status: int) -> None:
        self.left_with = status
        raise _Left


class _Queue:
    def __init__(self) -> None:
        self.active_jobs: list[list[object] | None] = [None, None]

    def __len__(self) -> int:
        return 0


class _Demo:
    """What GracefulStop reads of a running gr.Blocks: the queue's jobs, and close()."""

    def __init__(self) -> None:
        self.is_running, self._queue, self.closed = True, _Queue(), False

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def _not_stopping() -> Iterator[None]:
    shutdown.STOPPING.clear()
    yield
    shutdown.STOPPING.clear()


def _request(demo: _Demo, steps: int, step_s: float, cooperative: bool) -> tuple[threading.Thread, list[str]]:
    """A running request: ``steps`` units of work, reporting progress (and so cancellable) or not."""
    outcome: list[str] = []

    def callback(done: int, total: int, what: str) -> None:
        shutdown.raise_if_stopping()

    def work() -> None:
        try:
            for i in range(steps):
                time.sleep(step_s)
                progress.step(callback if cooperative else None, i + 1, steps, "test")
            outcome.append("finished")
        except progress.Cancelled as exc:
            outcome.append(f"cancelled: {exc}")
        finally:
            demo._queue.active_jobs[0] = None

    demo._queue.active_jobs[0] = ["job"]
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, outcome


def _stop(demo: _Demo, grace_s: float) -> tuple[_Stop, float]:
    stop = _Stop(demo, grace_s)  # type: ignore[arg-type]
    start = time.monotonic()
    with pytest.raises(_Left):
        stop(signal.SIGTERM, None)
    return stop, time.monotonic() - start


def test_idle_server_closes_and_leaves_with_zero() -> None:
    demo = _Demo()
    stop, took = _stop(demo, 30)
    assert stop.left_with == 0 and demo.closed and took < 1
    assert shutdown.stopping()  # anything that would start now stops at once


def test_a_short_request_finishes_without_being_cancelled() -> None:
    demo = _Demo()
    thread, outcome = _request(demo, steps=3, step_s=0.1, cooperative=True)
    stop, took = _stop(demo, 6)
    assert outcome == ["finished"] and stop.left_with == 0 and demo.closed and took < 3


def test_a_long_request_is_cancelled_in_the_last_part_of_the_grace() -> None:
    demo = _Demo()
    thread, outcome = _request(demo, steps=1000, step_s=0.05, cooperative=True)
    stop, took = _stop(demo, 1.5)
    assert outcome == ["cancelled: The server is shutting down; please try again in a minute."]
    assert 1.0 <= took < 2.5  # asked once the last third of the grace began
    # closed: the request had ended before the grace was over (else it would have been dropped)
    assert stop.left_with == 0 and demo.closed and not thread.is_alive()


def test_work_that_cannot_be_cancelled_is_dropped_at_the_end_of_the_grace() -> None:
    demo = _Demo()
    thread, outcome = _request(demo, steps=100, step_s=0.05, cooperative=False)
    stop, took = _stop(demo, 1.0)
    assert 1.0 <= took < 2.0 and stop.left_with == 0
    assert not demo.closed  # its stream is still open: closing would make uvicorn cancel it and log a traceback
    assert outcome == [] and thread.is_alive()


def test_raise_if_stopping_is_quiet_until_the_server_stops() -> None:
    shutdown.raise_if_stopping()
    shutdown.STOPPING.set()
    with pytest.raises(progress.Cancelled, match="shutting down"):
        shutdown.raise_if_stopping()


@pytest.mark.slow
def test_sigterm_during_a_slow_request_exits_zero_within_the_grace_without_abort(tmp_path: Path) -> None:
    """Score-CAM (minutes here, no progress callback inside pytorch-grad-cam) in flight: before,
    the app aborted ("terminate called without an active exception", exit status -6)."""
    from gradio_client import Client, handle_file

    grace = 4
    proc, url = lt.start_app(["--resnet50", "untrained", "--sanet50", "untrained", "--weights-dir",
                              str(tmp_path / "none"), "--shutdown-grace", str(grace)],
                             log_path=tmp_path / "app.log", env={"GRADIO_TEMP_DIR": str(tmp_path / "gradio")})
    try:
        job = Client(url, verbose=False).submit(handle_file(str(EXAMPLES / "chelsea.jpg")), method="scorecam",
                                                api_name="/analyze")
        deadline = time.monotonic() + 120
        while job.status().code.name not in {"PROCESSING", "PROGRESS", "ITERATING"} and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # inside Score-CAM's masked forwards
        assert not job.done()
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=grace + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "app.log").read_text(errors="replace")
    shutdown_log = log[log.rindex("signal 15"):]
    assert status == 0, shutdown_log[-3000:]
    assert took < grace + 5, f"{took:.1f} s"
    for sign in ("terminate called", "Traceback", "Aborted", "core dumped"):
        assert sign not in log, log[-3000:]
    assert "dropping 1 running" in shutdown_log, shutdown_log
    with pytest.raises(Exception):  # noqa: B017 - the client learns that its request was dropped, any way
        job.result(timeout=30)

