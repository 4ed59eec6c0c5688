"""export.BackgroundWriter: the CLI's files written on a thread are the sequential path's files,
in order, with errors raised in the caller and memory bounded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from test_probes import prepared, tiny_lab

from sanet_viz import export
from sanet_viz.analysis import AnalysisOptions, analyze
from sanet_viz.export import BackgroundWriter, write_result
from sanet_viz.results import AnalysisResult


@pytest.fixture(scope="module")
def results() -> list[AnalysisResult]:
    lab = tiny_lab()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and steadier (see test_probes)
    try:
        return [analyze(lab, prepared(seed), AnalysisOptions(precision="fp32"), name=f"image-{seed}.jpg")
                for seed in (31, 32)]
    finally:
        torch.set_num_threads(threads)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_files_equal_the_sequential_path(results: list[AnalysisResult], tmp_path: Path) -> None:
    for n, result in enumerate(results):
        write_result(result, tmp_path / "sequential" / str(n))
    with BackgroundWriter(max_pending=1) as writer:
        for n, result in enumerate(results):
            writer.submit(result, tmp_path / "background" / str(n))
    sequential, background = folder_bytes(tmp_path / "sequential"), folder_bytes(tmp_path / "background")
    assert len(sequential) == 2 * 7  # 2 CAMs, 4 pictures, result.json per image
    assert background == sequential  # byte for byte, pictures included


def test_written_in_submission_order(results: list[AnalysisResult], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    monkeypatch.setattr(export, "write_result", lambda result, folder, opacity: written.append(Path(folder).name))
    with BackgroundWriter(max_pending=2) as writer:
        for n in range(7):
            writer.submit(results[n % 2], tmp_path / f"f{n}")
    assert written == [f"f{n}" for n in range(7)]


def test_a_write_error_is_raised_in_the_caller(results: list[AnalysisResult], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    writer = BackgroundWriter()
    writer.submit(results[0], tmp_path / "ok")
    writer.submit(results[1], blocker)  # mkdir fails
    writer.submit(results[0], tmp_path / "after")
    with pytest.raises(FileExistsError, match="not-a-folder"):
        writer.close()
    assert (tmp_path / "ok" / export.RESULT_FILE).is_file()
    assert not (tmp_path / "after").exists()  # nothing after the error is written
    writer.close()  # raised once; closing again is a no-op
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(results[0], tmp_path / "late")


def test_the_next_submit_raises_an_earlier_error(results: list[AnalysisResult], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    failed = threading.Event()

    def broken(result: AnalysisResult, folder: Path, opacity: float) -> None:
        failed.set()
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_result", broken)
    writer = BackgroundWriter()
    writer.submit(results[0], tmp_path / "a")
    assert failed.wait(10)
    with pytest.raises(OSError, match="disk full"):
        for _ in range(500):  # the error is stored a few instructions after the event
            writer.submit(results[1], tmp_path / "b")
            threading.Event().wait(0.01)
    writer.close()


def test_the_callers_exception_wins_and_keeps_the_write_error(results: list[AnalysisResult], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(result: AnalysisResult, folder: Path, opacity: float) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_result", broken)
    with pytest.raises(KeyError, match="caller") as info, BackgroundWriter() as writer:
        writer.submit(results[0], tmp_path / "a")
        raise KeyError("caller")
    assert any("disk full" in note for note in info.value.__notes__)


def test_pending_results_are_bounded(results: list[AnalysisResult], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(result: AnalysisResult, folder: Path, opacity: float) -> None:
        started.set()
        assert release.wait(30)

    monkeypatch.setattr(export, "write_result", slow)
    writer = BackgroundWriter(max_pending=2)
    writer.submit(results[0], tmp_path / "0")  # taken by the thread
    assert started.wait(10)
    writer.submit(results[1], tmp_path / "1")
    writer.submit(results[0], tmp_path / "2")  # the queue is now full
    blocked = threading.Thread(target=writer.submit, args=(results[0], tmp_path / "3"))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # waits for room instead of holding a fourth result
    release.set()
    blocked.join(10)
    assert not blocked.is_alive()
    writer.close()
    with pytest.raises(ValueError, match="at least 1"):
        BackgroundWriter(max_pending=0)
