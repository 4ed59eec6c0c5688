"""What happens when a visitor acts. Every handler returns (or yields) a dict from components to
values, so tests call them directly, without a server. Computation lives in the engine; views
come from :mod:`views`; per-visitor state in :class:`session.Session`.

Fairness: the fast lane (Analyse: heatmaps, gates, probe) never waits for a slow method. In a
browser, Score-CAM and Ablation-CAM are left pending by the fast lane and completed by
:meth:`Handlers.complete_slow` in a lane of their own (one at a time), without holding the
models' locks, with progress on the panel being computed and a Cancel button. API calls, which
have no page to come back to, complete them inline, through the same one-at-a-time lane.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from .. import figures
from ..analysis import (
    AnalysisOptions,
    add_probes,
    explain,
)
from ..cam import CAM_METHODS, MULTI_PASS_METHODS
from ..export import write_result, zip_folder
from ..lab import Lab
from ..preprocessing import DecodeLimits, ImageDecodeError
from ..progress import Cancelled
from ..results import AnalysisResult, ModelResult
from . import views
from .correlate import CorrelationHandlers
from .depth import DepthHandlers, result_charts
from .faithfulness import FaithfulnessHandlers
from .pairs import PairHandlers
from .pool import ModelPool, PairError
from .session import Session
from .slow import SlowLaneHandlers
from .tabs import (
    PREDICTED,
    SLOTS,
    CompareTab,
    Controls,
    CorrelationTab,
    DepthTab,
    DownloadTab,
    FaithfulnessTab,
    GroupsTab,
)

__all__ = ["AppSettings", "Page", "Handlers"]

log = logging.getLogger("sanet-viz")
EXAMPLES_DIR = Path(__file__).resolve().parent.parent.parent / "examples"


@dataclass
class AppSettings:
    examples_dir: Path = EXAMPLES_DIR
    output_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "sanet-viz-outputs")
    output_ttl_s: float = 3600.0
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    max_correlation_images: int = 48
    cache_ttl_s: int = 3600  # Gradio's copies of uploads and outputs are deleted after this
    concurrency: int = 2  # analyses running at once in the fast lane; more wait in the queue
    profiles: Any = None  # per-class reference profiles from `reproduce` (optional)
    stopping: Callable[[], bool] = lambda: False  # the server is shutting down: long work stops
    precision: str = "auto"  # of the probe's masked forwards (--precision); auto: the check at warm-up decides


@dataclass
class Page:
    """Every component a handler may update."""

    session: gr.State
    controls: Controls
    compare: CompareTab
    groups: GroupsTab
    depth: DepthTab
    correlation: CorrelationTab
    faithfulness: FaithfulnessTab
    download: DownloadTab
    banner: gr.HTML | None = None  # every offered model's weights, in one sentence

    def faithfulness_outputs(self) -> list[Any]:
        f = self.faithfulness
        return [f.verdict, f.curves, f.road, f.cascade, f.strips]

    def analysis_outputs(self) -> list[Any]:
        """What an analysis updates: the API's outputs (and the slow lane's)."""
        return [*self.compare_outputs(), *self._other_tabs()]

    def compare_outputs(self) -> list[Any]:
        """The page's *Analyse* event: the Compare tab and the analysis' state."""
        c = self.compare
        return [self.session, self.controls.cancel, c.status, *c.images.values(), *c.top5.values(),
                *c.captions.values(), c.difference, c.difference_caption]

    def rest_outputs(self) -> list[Any]:
        """The event chained after it: the other tabs (and the state, the status and Cancel first)."""
        return [self.session, self.controls.cancel, self.compare.status, *self._other_tabs()]

    def _other_tabs(self) -> list[Any]:
        g, d = self.groups, self.depth
        return [g.probe, g.grid, g.group, g.detail_image, g.detail_text, d.heatmap, d.lines, d.nearest,
                self.download.archive, self.download.result_json, self.download.figures, *self.faithfulness_outputs()]


class Handlers(SlowLaneHandlers, FaithfulnessHandlers, CorrelationHandlers, PairHandlers, DepthHandlers):
    def __init__(self, models: Lab | ModelPool, settings: AppSettings, page: Page) -> None:
        self.pool = models if isinstance(models, ModelPool) else ModelPool.of(models)
        self.settings, self.page = settings, page
        self.slow_lane = threading.Semaphore(1)

    @property
    def lab(self) -> Lab:
        """The starting pair's models (a visitor's own pair: :meth:`lab_of`)."""
        return self.pool.lab(self.pool.start)

    # ----------------------------------------------------------------------------------------
    # Page and image

    def new_session(self) -> dict[Any, Any]:
        """On page load: a session that belongs to a browser page; the pickers and the banner as
        they are now (a model loaded since the server started may have turned out untrained)."""
        c = self.page.compare
        out: dict[Any, Any] = {self.page.session: Session(page=True), c.left: gr.update(choices=self.pool.choices()),
                               c.right: gr.update(choices=self.pool.choices())}
        if self.page.banner is not None:
            out[self.page.banner] = self.banner()
        return out

    def new_image(self, path: str | None, session: Session | None) -> dict[Any, Any]:
        """A new picture (or none): refuse what is not a picture at once, clear stale results."""
        session = session or Session()
        session.start()  # whatever ran for the old picture stops
        session.result = None
        cleared = self._cleared(session)
        if not path:
            session.image, session.image_key = None, ""
            return cleared
        try:
            self._prepare(path, session)
        except gr.Error as exc:
            gr.Warning(str(exc.message), duration=15)
            session.image, session.image_key = None, ""
            return {**cleared, self.page.controls.image: None,
                    self.page.compare.status: views.status_html(exc.message, kind="error")}
        return {**cleared, self.page.compare.status: views.status_html("Ready: press <b>Analyse</b>.")}

    def _prepare(self, path: str | None, session: Session, lab: Lab | None = None) -> Any:
        """The picture prepared for the models of ``lab`` (default: the visitor's pair)."""
        if not path:
            raise gr.Error("Add an image first: upload, drop, paste, use the webcam, or pick an example.",
                           print_exception=False)
        try:
            key = f"{path}:{os.path.getmtime(path)}"
        except OSError:
            raise gr.Error(f"{Path(path).name}: the upload is no longer on the server; please add it again.",
                           print_exception=False) from None
        lab = lab or self.lab_of(session)
        if key != session.image_key or session.image is None or not _prepared_for(session.image, lab):
            try:
                image = lab.prepare(path, limits=self.settings.limits, name=Path(path).name)
            except ImageDecodeError as exc:  # the visitor's file: a message for them, one log line here
                log.info("refused upload: %s", exc)
                raise gr.Error(str(exc), print_exception=False) from None
            if key != session.image_key:  # the same picture made for another pair keeps its probes
                session.result = None
            session.image_key, session.image = key, image
        return session.image

    def _cleared(self, session: Session) -> dict[Any, Any]:
        """Every result view emptied: nothing of an older picture stays beside a new one."""
        p = self.page
        out: dict[Any, Any] = {p.session: session, p.controls.cancel: gr.update(visible=False),
                               p.compare.difference: None, p.compare.difference_caption: "",
                               p.groups.probe: "", p.groups.grid: "", p.groups.detail_image: None,
                               p.groups.detail_text: "", p.depth.heatmap: None, p.depth.lines: None,
                               p.depth.nearest: "", p.download.archive: None, p.download.result_json: None,
                               p.download.figures: None, p.faithfulness.verdict: "", p.faithfulness.curves: None,
                               p.faithfulness.road: "", p.faithfulness.cascade: None, p.faithfulness.strips: None}
        for slot in SLOTS:
            out |= {p.compare.images[slot]: None, p.compare.top5[slot]: "", p.compare.captions[slot]: ""}
        return out

    # ----------------------------------------------------------------------------------------
    # Analysis: the fast lane

    def options(self, method: str, target: str | None, layer: str | None,
                lab: Lab | None = None) -> AnalysisOptions:
        target_class = None if not target or target == PREDICTED else int(str(target).split(":")[0])
        return AnalysisOptions(method=method, target_class=target_class, cam_layer=layer or None,
                               precision=self.settings.precision,
                               num_classes=min(lm.num_classes for lm in (lab or self.lab).models.values()))

    def analyse(self, path: str | None, method: str, target: str | None, layer: str | None, opacity: float,
                probe_resnet: bool, faithfulness: bool, session: Session | None,
                models: str | None = None) -> Iterator[dict[Any, Any]]:
        """Heatmaps first, then group maps and gates, then the right model's probe (and the left
        one's if asked: ``probe_resnet``, named for the default pair's left model).

        ``models``: "KEY,KEY" (left, right) for this analysis only; empty: the visitor's pair. It is
        the API's optional last input: a client keeps its session between calls, and its next call
        without it gets the starting pair again. In a browser the pickers set the pair.

        A slow method's maps are left pending for :meth:`complete_slow` in a browser; an API call
        completes them here. The last message holds everything (what API clients get).
        """
        session = session or Session()
        yield from self._compare_part(path, method, target, layer, opacity, probe_resnet, faithfulness, session,
                                      models)
        yield from self._take_rest(session)

    def analyse_page(self, path: str | None, method: str, target: str | None, layer: str | None, opacity: float,
                     probe_resnet: bool, faithfulness: bool, session: Session | None,
                     models: str | None = None) -> Iterator[dict[Any, Any]]:
        """The page's *Analyse*: :meth:`analyse`'s messages for the Compare tab only, from an event
        whose outputs are only that tab's (:meth:`Page.compare_outputs`); :meth:`continue_analysis`,
        chained after it, does the rest. Gradio's page handles each message of an event in time that
        grows with the event's outputs: with all 27, Chromium worked ~130 ms more between the click
        and the heatmaps, on the cores the models were using (docs/performance.md)."""
        keep = set(self.page.compare_outputs())
        for message in self._compare_part(path, method, target, layer, opacity, probe_resnet, faithfulness,
                                          session or Session(), models):
            yield {k: v for k, v in message.items() if k in keep}

    def continue_analysis(self, session: Session | None) -> Iterator[dict[Any, Any]]:
        """After :meth:`analyse_page`: the other tabs emptied of an earlier result at once, then the
        rest of :meth:`analyse` (group maps, gates, probes, the downloads)."""
        yield from self._at_least_one(self._continue(session))

    def _continue(self, session: Session | None) -> Iterator[dict[Any, Any]]:
        if session is None or session.rest is None:
            return
        keep = set(self.page.rest_outputs())
        c = self.page.controls
        # The status and Cancel stay as the heatmaps left them (a slow method's estimate, its Cancel).
        yield {k: v for k, v in self._cleared(session).items()
               if k in keep and k not in (c.cancel, self.page.compare.status)}
        for message in self._take_rest(session):
            yield {k: v for k, v in message.items() if k in keep}

    def reanalyse(self, path: str | None, method: str, target: str | None, layer: str | None, opacity: float,
                  probe_resnet: bool, faithfulness: bool, session: Session | None,
                  models: str | None = None) -> Iterator[dict[Any, Any]]:
        """A control changed: analyse again (as :meth:`analyse_page`) if there is a picture, and say
        nothing if there is none."""
        if session is not None and session.image is not None and path:
            yield from self.analyse_page(path, method, target, layer, opacity, probe_resnet, faithfulness, session,
                                         models)

    def _compare_part(self, path: str | None, method: str, target: str | None, layer: str | None, opacity: float,
                      probe_resnet: bool, faithfulness: bool, session: Session,
                      models: str | None) -> Iterator[dict[Any, Any]]:
        """The analysis up to the Compare tab's views; what follows is left in ``session.rest``."""
        run = session.start()
        session.faithfulness = bool(faithfulness)
        session.rest = None
        try:
            pair = self.pool.pair(models) if models else self.pair_of(session)
        except PairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        yield from self._loading(pair)
        lab = self.pool.lab(pair)
        image = self._prepare(path, session, lab)
        options = self.options(method, target, layer, lab)
        yield from self._guarded(session, run, self._heatmaps(session, run, image, options, path, opacity, lab))
        if session.current(run) and session.result is not None:
            session.rest = self._guarded(session, run, self._rest(session, run, options, opacity, probe_resnet))

    def _take_rest(self, session: Session) -> Iterator[dict[Any, Any]]:
        rest, session.rest = session.rest, None  # taken once, by whichever event comes first
        if rest is not None:
            yield from rest

    def _guarded(self, session: Session, run: int, messages: Iterator[dict[Any, Any]]) -> Iterator[dict[Any, Any]]:
        try:
            yield from messages
        except Cancelled as exc:  # a newer request of this visitor, Cancel, or a server stopping
            if self.settings.stopping():
                raise gr.Error("The server is shutting down; please try again in a minute.",
                               print_exception=False) from None
            if run == session.run:  # a newer request owns the page now: say nothing over it
                yield {self.page.compare.status: views.status_html(f"Stopped: {exc}.", kind="stale"),
                       self.page.controls.cancel: gr.update(visible=False)}

    def _heatmaps(self, session: Session, run: int, image: Any, options: AnalysisOptions, path: str | None,
                  opacity: float, lab: Lab) -> Iterator[dict[Any, Any]]:
        check = session.checker(run, self.settings.stopping)
        slow = options.method in MULTI_PASS_METHODS
        previous = session.result
        label = CAM_METHODS[options.method][1].split(" (")[0]
        yield {**self._cleared(session), self.page.compare.status: views.status_html(
            f"Computing {label} for both models…", kind="busy")}
        result = explain(lab, image, options, name=Path(path or "image").name, defer_slow=slow)
        self._keep_probes(result, previous)
        session.result = result
        check()
        status = self._slow_estimate(result, options) if slow else ""
        # The heatmaps first (what a visitor waits for), then the difference map, then the other
        # tabs' views (the depth charts take half a second to draw). Gradio's cost of a message
        # grows with its images (a PNG each, ~15 ms) and with every output it skips (~1 ms each:
        # it rebuilds the component), so the heatmaps' message repeats the cleared values instead.
        yield {**self._cleared(session), **self._heatmap_views(session, opacity),
               self.page.compare.status: views.status_html(status, kind="busy"),
               self.page.controls.cancel: gr.update(visible=slow and session.page)}
        yield self._difference_views(session)

    def _rest(self, session: Session, run: int, options: AnalysisOptions, opacity: float,
              probe_resnet: bool) -> Iterator[dict[Any, Any]]:
        check = session.checker(run, self.settings.stopping)
        check()  # a newer analysis may have started since the heatmaps
        result = session.result
        assert result is not None
        method = options.method
        slow = method in MULTI_PASS_METHODS
        label = CAM_METHODS[method][1].split(" (")[0]
        yield {**self._groups_views(session), **self._depth_views(session), **self._faithfulness_views(session)}
        left, right = result.models  # the pair, in order: the right model is always probed, the left on demand
        yield from self._probes(session, (right,) + ((left,) if probe_resnet else ()), check)
        if slow and session.page:
            return  # completed by complete_slow, in the slow lane
        if slow:  # an API call: complete here, but never wait for the slow lane in a fast-lane slot
            if not self.slow_lane.acquire(blocking=False):
                raise gr.Error(f"Another visitor's {label} is running (one at a time on this server); please try "
                               "again in a few minutes, or use Grad-CAM.", print_exception=False)
            try:
                yield from self._complete_pending(session, run, options, opacity)
            finally:
                self.slow_lane.release()
            if self._pending(result):
                return
        if session.faithfulness:
            yield from self._measure(session, check)
        yield self._final(session, opacity)

    def _keep_probes(self, result: AnalysisResult, previous: AnalysisResult | None) -> None:
        """Probes depend only on the image: keep them across changes of method, class or layer."""
        if previous is None or previous.image_name != result.image_name:
            return
        for key, mr in result.models.items():
            if key in previous.models and previous.models[key].probe is not None:
                before = previous.models[key]
                mr.probe, mr.precision, mr.precision_check = before.probe, before.precision, before.precision_check

    def _probes(self, session: Session, keys: Sequence[str], check: Callable[[], None]) -> Iterator[dict[Any, Any]]:
        result = session.result
        assert result is not None and session.image is not None
        for key in keys:
            if key in result.models and result.models[key].probe is None:
                check()
                add_probes(self.lab_for(result), session.image, result, model_keys=(key,))
                yield self._groups_views(session)

    def _pending(self, result: AnalysisResult) -> list[str]:
        return [k for k, m in result.models.items() if m.pending_cam is not None]

    def _at_least_one(self, messages: Iterator[dict[Any, Any]]) -> Iterator[dict[Any, Any]]:
        """``messages``, or one "no change": Gradio ends a generator that yielded nothing with None
        for every output, which blanks views the page already shows (seen: the Across depth charts
        after every Grad-CAM analysis, and every view after a cancelled Score-CAM)."""
        empty = True
        for message in messages:
            empty = False
            yield message
        if empty:  # a dict must name a component to be read as updates (an empty one is one value)
            yield {self.page.compare.status: gr.skip()}

    # ----------------------------------------------------------------------------------------
    # Views of the current result

    def _views(self, session: Session, opacity: float) -> dict[Any, Any]:
        return {**self._compare_views(session, opacity), **self._groups_views(session),
                **self._depth_views(session), **self._faithfulness_views(session)}

    def _compare_views(self, session: Session, opacity: float) -> dict[Any, Any]:
        return {**self._heatmap_views(session, opacity), **self._difference_views(session)}

    def _heatmap_views(self, session: Session, opacity: float) -> dict[Any, Any]:
        result, c = session.result, self.page.compare
        if result is None:
            return {}
        out: dict[Any, Any] = {}
        for slot, (key, m) in zip(SLOTS, result.models.items(), strict=True):
            out[c.images[slot]] = views.cam_image(result, key, opacity=opacity, view=session.view)
            out[c.top5[slot]] = views.top5_html(m)
            out[c.captions[slot]] = views.caption_html(m) if m.cam is not None else views.status_html(
                "Waiting for its turn in the slow lane…", kind="busy")
        return out

    def _difference_views(self, session: Session) -> dict[Any, Any]:
        result, c = session.result, self.page.compare
        if result is None:
            return {}
        return {c.difference: views.difference_image(result, view=session.view),
                c.difference_caption: self._difference_caption(list(result.models.values()))}

    @staticmethod
    def _difference_caption(models: list[ModelResult]) -> str:
        if len(models) != 2 or any(m.cam is None for m in models):
            return ""
        a, b = models
        if a.class_agnostic or a.target_class == b.target_class:
            return '<div class="caption">Both maps explain the same class.</div>'
        return (f'<div class="caption">Careful: {a.display_name} explains <b>{a.target_label}</b>, '
                f'{b.display_name} <b>{b.target_label}</b>; choose one class to compare like with like.</div>')

    def _groups_views(self, session: Session) -> dict[Any, Any]:
        """The right model's group maps (it is always probed) and every probe so far."""
        result, g = session.result, self.page.groups
        if result is None:
            return {}
        key = list(result.models)[-1]
        picture, text = views.group_detail(result, session.group, key=key)
        return {g.probe: views.probe_chart_html(result, sort=session.sort, selected=session.group),
                g.grid: views.group_grid_html(result, selected=session.group, key=key), g.group: session.group,
                g.detail_image: picture, g.detail_text: text}

    def _final(self, session: Session, opacity: float) -> dict[Any, Any]:
        """Every view complete, the zip and result.json written: the message API clients get."""
        result = session.result
        assert result is not None
        data, archive = self._save_outputs(result)
        return {**self._views(session, opacity), self.page.session: session,
                self.page.compare.status: "", self.page.controls.cancel: gr.update(visible=False),
                self.page.download.archive: archive, self.page.download.result_json: data}

    def _save_outputs(self, result: AnalysisResult) -> tuple[dict[str, Any], str]:
        _prune(self.settings.output_dir, self.settings.output_ttl_s)
        self.settings.output_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="analysis-", dir=self.settings.output_dir))
        data = write_result(result, folder)
        archive = folder.with_suffix(".zip")
        archive.write_bytes(zip_folder(folder))
        return data, str(archive)

    def make_figures(self, layout: str, difference: bool, opacity: float,
                     session: Session | None) -> dict[Any, Any]:
        """The comparison figure of the current image (PDF, SVG, PNG) and every chart as SVG."""
        result = session.result if session else None
        if result is None or any(m.cam is None for m in result.models.values()):
            raise gr.Error("Analyse an image first (and let a slow method finish).", print_exception=False)
        columns = ("input", *result.models, *(("difference",) if difference and len(result.models) == 2 else ()))
        self.settings.output_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="analysis-figures-", dir=self.settings.output_dir))
        stem = Path(result.image_name).stem or "image"
        figure = figures.result_figure(result, columns=columns, layout=layout, opacity=opacity)
        paths = [figures.save_figure(figure, folder / f"{stem}-figure-{layout}.{fmt}") for fmt in figures.FORMATS]
        for name, chart in result_charts(result).items():
            path = folder / f"{stem}-{name}.svg"
            path.write_bytes(figures.svg_bytes(chart, tight=True))
            paths.append(path)
        return {self.page.download.figures: [str(p) for p in paths]}

    def rerender(self, opacity: float, view: str, session: Session | None) -> dict[Any, Any]:
        """Opacity or view changed: redraw the heatmaps (typed, dragged or keyed values all apply)."""
        if session is not None:
            session.view = view
        if session is None or session.result is None:
            return {self.page.compare.difference: gr.skip()}  # see _at_least_one: {} is not "no change"
        return self._compare_views(session, opacity)

    def select_group(self, k: float | None, session: Session | None) -> dict[Any, Any]:
        if session is None or session.result is None or k is None:
            return {self.page.groups.group: gr.skip()}
        session.group = int(np.clip(round(float(k)), 0, 63))
        return self._groups_views(session)

    def group_clicked(self, session: Session | None, evt: gr.EventData) -> dict[Any, Any]:
        """A click on a bar or a map: open that group."""
        return self.select_group(getattr(evt, "group", None), session)

    def resort(self, sort: str, session: Session | None) -> dict[Any, Any]:
        if session is not None:
            session.sort = sort
        if session is None or session.result is None:
            return {self.page.groups.probe: gr.skip()}
        return {self.page.groups.probe: views.probe_chart_html(session.result, sort=sort, selected=session.group)}

    def add_left_probe(self, probe_left: bool, opacity: float, session: Session | None) -> Iterator[dict[Any, Any]]:
        """The left model's probe for the image already analysed, when the box is ticked."""
        yield from self._at_least_one(self._add_left_probe(probe_left, opacity, session))

    add_resnet_probe = add_left_probe  # its name when the left model was always ResNet50

    def _add_left_probe(self, probe_left: bool, opacity: float,
                        session: Session | None) -> Iterator[dict[Any, Any]]:
        if not probe_left or session is None or session.result is None or session.image is None:
            return
        check = session.checker(session.run, self.settings.stopping)
        yield from self._probes(session, tuple(session.result.models)[:1], check)
        if not self._pending(session.result):
            yield self._final(session, opacity)


def _prepared_for(image: Any, lab: Lab) -> bool:
    """Whether ``image`` was prepared for every model of ``lab``, its display by the first one's
    preprocessing (as :meth:`Lab.prepare` makes it for that pair)."""
    needed = lab.transforms
    made = {image.transform, *image.others}
    return image.transform in (None, needed[0]) and (image.transform is None or set(needed) <= made)


def _prune(folder: Path, ttl_s: float) -> None:
    """Delete this app's outputs older than ``ttl_s`` (Gradio keeps its own copies for serving)."""
    cutoff = time.time() - ttl_s
    for path in folder.glob("analysis-*"):
        try:
            if path.stat().st_mtime < cutoff:
                if path.is_dir():
                    for child in path.iterdir():
                        child.unlink()
                    path.rmdir()
                else:
                    path.unlink()
        except OSError:
            pass  # another request pruned it first
