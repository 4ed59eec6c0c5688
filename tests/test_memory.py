"""Memory: nothing of a request outlives it, unused model copies are freed, and the server hands
freed memory back (sanet_viz/server/memory.py; numbers in docs/limits.md, "Memory")."""

from __future__ import annotations

import gc
import platform
import threading
import time

import pytest
import torch
from test_reproduce import tiny_lab

from sanet_viz.analysis import AnalysisOptions, analyze
from sanet_viz.preprocessing import PreparedImage
from sanet_viz.probes import PrecisionCheck
from sanet_viz.server import memory


def _live_tensors() -> tuple[int, int]:
    """(tensors that are not parameters, of them those with an autograd graph) in this process."""
    gc.collect()
    # type(), not isinstance: some module proxies warn when their __class__ is read
    tensors = [o for o in gc.get_objects()
               if issubclass(type(o), torch.Tensor) and not issubclass(type(o), torch.nn.Parameter)]
    return len(tensors), sum(t.grad_fn is not None for t in tensors)


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_no_tensor_or_graph_outlives_a_request(method: str) -> None:
    lab = tiny_lab()
    torch.manual_seed(0)
    image = PreparedImage(torch.rand(1, 3, 224, 224), torch.zeros(1, 1, 3, dtype=torch.uint8), (224, 224))
    options = AnalysisOptions(method=method, precision="fp32", probe_batch_size=8)
    analyze(lab, image, options)  # first-call costs (caches), then count
    before = _live_tensors()

    def request() -> None:  # as the server runs it: in a worker thread, the result dropped after
        result = analyze(lab, image, options)
        assert result.models["sanet50"].probe is not None

    worker = threading.Thread(target=request)
    worker.start()
    worker.join()
    assert _live_tensors() == before
    assert before[1] == 0  # and no autograd graph is kept anywhere


def test_a_failed_bf16_check_frees_the_bf16_copy_and_bf16_still_works() -> None:
    lm = tiny_lab().models["resnet50"]
    assert lm.probe_model_for("bf16") is lm.probe_model_for("bf16")  # made once, then kept
    assert lm._fast_model_bf16 is not None
    lm.bf16_check = PrecisionCheck("x.jpg", 0.001, 0.99)  # passed: bf16 is used, keep it
    assert lm._fast_model_bf16 is not None
    lm.bf16_check = PrecisionCheck("x.jpg", 0.3, 0.1)  # failed: auto stays in fp32
    assert lm._fast_model_bf16 is None and lm.probe_precision("auto") == "fp32"
    again = lm.probe_model_for("bf16")  # an explicit bf16 probe makes it again
    assert next(again.parameters()).dtype == torch.bfloat16


def test_a_slower_bf16_is_freed_too_and_mixed_is_kept_only_when_chosen() -> None:
    lm = tiny_lab().models["resnet50"]
    lm.probe_model_for("mixed")  # makes the bf16 copy and the mixed model over it
    lm.bf16_check = PrecisionCheck("x.jpg", 0.3, 0.1, seconds={"fp32": 1.0, "bf16": 0.5, "mixed": 0.8},
                                   mixed=PrecisionCheck("x.jpg", 0.001, 0.99))  # mixed chosen
    assert lm.bf16_check.verdict == "mixed" and lm._fast_model_mixed is not None
    lm.bf16_check = PrecisionCheck("x.jpg", 0.001, 0.99, seconds={"fp32": 1.0, "bf16": 1.4})  # passed, slower
    assert lm.bf16_check.verdict == "fp32"
    assert lm._fast_model_bf16 is None and lm._fast_model_mixed is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_memory_trims_on_glibc() -> None:
    assert memory.release_memory() is True


class _Times:
    def __init__(self) -> None:
        self.count = 0


class _Queue:
    def __init__(self) -> None:
        self.active_jobs: list[list[object] | None] = [None]
        self.process_time_per_fn = {"analyze": _Times()}

    def __len__(self) -> int:
        return 0


class _Demo:
    def __init__(self) -> None:
        self._queue = _Queue()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_memory_is_released_after_each_finished_request() -> None:
    demo = _Demo()
    releaser = memory.MemoryReleaser(demo, every_s=0.02)  # type: ignore[arg-type]
    releaser.start()
    try:
        time.sleep(0.1)
        assert releaser.releases == 0  # idle: nothing to hand back
        demo._queue.active_jobs[0] = ["job"]
        time.sleep(0.1)
        demo._queue.active_jobs[0] = None  # the request ended
        demo._queue.process_time_per_fn["analyze"].count += 1
        time.sleep(0.1)
        after_first = releaser.releases
        assert after_first >= 1  # (two if a poll fell between the two lines above)
        demo._queue.process_time_per_fn["analyze"].count += 1  # one that began and ended between polls
        time.sleep(0.1)
        assert releaser.releases == after_first + 1
    finally:
        releaser.stopped.set()
        releaser.join()
