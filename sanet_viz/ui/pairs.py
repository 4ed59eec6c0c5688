"""Which two models a visitor compares: the Compare tab's pickers, the words that follow the pair
(headings, colour bar, notes), and loading a model the first time a visitor picks it (a mixin of
:class:`handlers.Handlers`).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..attention import LAYOUTS, GateLayout
from ..weights import MODEL_SPECS
from . import views
from .pool import ModelPool, PairError
from .session import Session
from .texts import ADD_WEIGHTS, SA_NET_URL

if TYPE_CHECKING:
    from ..lab import Lab
    from ..results import AnalysisResult

__all__ = ["PairHandlers", "PairTexts", "pair_texts", "correlation_headers", "gate_layout", "recipe_note",
           "weights_banner"]

log = logging.getLogger("sanet-viz")


@dataclass(frozen=True)
class PairTexts:
    difference: str  # "SANet50 minus ResNet50": the right model's map minus the left one's
    difference_bar: str  # HTML colour bar with both ends named
    probe_left: str  # the checkbox that adds the left model's probe
    note: str  # where the pair's accuracies come from different training recipes ("" if not)
    depth: str  # the Across depth tab: each model's gates and their unit, or that it has none
    correlation: str  # the Class correlation tab's introduction


def gate_layout(pool: ModelPool, key: str) -> GateLayout | None:
    """The model's gate layout: read from it once loaded, else from its registry entry."""
    lm = pool.models.get(key)
    if lm is not None:
        return lm.gate_layout if lm.has_gates else None
    kind = MODEL_SPECS[key].attention
    return LAYOUTS[kind] if kind else None


def _unit(layout: GateLayout) -> str:
    if layout.unit == "group":
        return "per SA group: the mean channel gate and the mean spatial gate of each of its 64 groups"
    return "one gate per channel (256 to 2048 per module)"


def recipe_note(pool: ModelPool, pair: Sequence[str]) -> str:
    """One sentence where a model of the pair runs weights trained with another recipe than its
    paper's (timm's SE and ECA): part of an accuracy difference is the recipe's."""
    def meta(key: str) -> Mapping[str, Any]:
        return MODEL_SPECS[key].weights.meta if key in MODEL_SPECS else {}

    known = [k for k in pair if pool.pretrained(k) is not False and "acc@1" in meta(k)]  # not untrained
    others = [k for k in known if meta(k)["acc@1"] != meta(k).get("paper_acc@1")]
    if not others:
        return ""
    parts = [f"{pool.name(k)} runs {meta(k)['source'].split(' (')[0]}'s weights: {meta(k)['acc@1']:.2f} % top-1 on "
             f"ImageNet, trained with a newer recipe than its paper's {meta(k)['paper_acc@1']:.2f} %" for k in others]
    beside = "".join(f" ({pool.name(k)}'s released weights: {meta(k)['acc@1']:.2f} %)" for k in known
                     if k not in others)
    return (f'<div class="pair-note">{"; ".join(parts)}{beside}. Accuracy differences in this pair come partly from '
            "the training recipe, not only from the attention module.</div>")


def pair_texts(pool: ModelPool, pair: Sequence[str]) -> PairTexts:
    left, right = (pool.name(k) for k in pair)
    depth = []
    for key in pair:
        layout = gate_layout(pool, key)
        name = pool.name(key)
        depth.append(f"- **{name}**: {layout.title} ({layout.kind}) gates in every block, {_unit(layout)}."
                     if layout else f"- **{name} has no attention modules**: it has no gates to show here.")
    gated = [k for k in pair if gate_layout(pool, k)]
    if len(gated) == 2:
        depth.append("- The second chart puts both on one axis of depth (stage_block: 2_1 is the first block, 5_3 "
                     "the last), each in its own unit.")
    if [gate_layout(pool, k).kind for k in gated] == ["SA"]:  # type: ignore[union-attr]
        correlation = ("Upload images of several classes. For each SA depth: how alike the classes' SA gate profiles "
                       "are (the paper: shared early, class-specific late).")
    else:
        which = " and ".join(f"{pool.name(k)} ({gate_layout(pool, k).kind})" for k in gated)  # type: ignore[union-attr]
        correlation = ("Upload images of several classes. For each depth: how alike the classes' gate profiles are, "
                       f"for {which or 'neither model (no attention gates)'} (the paper: shared early, "
                       "class-specific late).")
    return PairTexts(
        difference=f"{right} minus {left}",
        difference_bar=views.colorbar_html(views.DIFF_CMAP, f"{left} looks more", f"{right} looks more", "0: alike"),
        probe_left=f"Also probe {left} (takes as long again)", note=recipe_note(pool, pair),
        depth="\n".join(depth), correlation=correlation)


def correlation_headers(names: Sequence[str]) -> list[str]:
    """The correlation table's columns: one prediction per gated model."""
    return ["image", "class used", *(f"{n} prediction" for n in names)]


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def weights_banner(pool: ModelPool) -> tuple[str, str]:
    """(one sentence for visitors, detail for the operator) about every offered model's weights.

    The operator's detail (paths, download errors, variables) stays out of the visitor's sentence;
    it is also in the server log. A model not loaded yet is named as it will run where that is known
    (no weights found: untrained), and as loading on first use.
    """
    keys = pool.offered
    untrained = [pool.name(k) for k in keys if pool.pretrained(k) is False]
    trained = [pool.name(k) for k in keys if pool.pretrained(k) is not False]
    later = [pool.name(k) for k in keys if not pool.loaded(k) and pool.pretrained(k) is not False]
    one = len(later) == 1
    pending = f" {_and(later)} load{'s' if one else ''} when a visitor first picks {'it' if one else 'them'}." \
        if later else ""
    if not untrained:
        names = ", ".join(trained)
        visitor = (f'<div class="banner banner-pretrained">{names}: {"both" if len(keys) == 2 else "all"} run with '
                   f"their published, pretrained weights.{pending}</div>")
        return visitor, ""
    who = _and(untrained)
    also = (f"{html.escape(_and(trained))} run{'s' if len(trained) == 1 else ''} with published, pretrained weights."
            f"{pending} " if trained else "")
    visitor = (f'<div class="banner banner-untrained">{also}<b>Demo mode:</b> {html.escape(who)} '
               f"{'run' if len(untrained) > 1 else 'runs'} with random, untrained weights, so "
               f"{'their' if trained else 'the'} pictures show how the tool works, not what the networks learned. "
               f'<a href="{SA_NET_URL}" target="_blank" rel="noopener">The real weights</a> · '
               '<a href="#operator-notes">how to add them</a>.</div>')
    lines = []
    for k in keys:
        lm = pool.models.get(k)
        if lm is not None:
            lines.append(f"- **{lm.display_name}**: " + (f"pretrained, {lm.weights.source}" if lm.weights.pretrained
                                                          else f"untrained: {lm.weights.note}"))
        else:
            e = pool.expected(k)
            lines.append(f"- **{pool.name(k)}** (loads on first use): " + (
                "weights not known yet" if e is None else f"from {e.note}" if e.pretrained else f"untrained: {e.note}"))
    return visitor, "\n".join(lines) + "\n\n" + ADD_WEIGHTS


class PairHandlers:
    """Picking, swapping and loading the pair (a mixin of :class:`handlers.Handlers`)."""

    pool: ModelPool
    settings: Any
    page: Any
    analyse: Callable[..., Iterator[dict[Any, Any]]]
    _at_least_one: Callable[[Iterator[dict[Any, Any]]], Iterator[dict[Any, Any]]]
    _cleared: Callable[[Session], dict[Any, Any]]

    def banner(self) -> str:
        """The visitor's sentence about every offered model's weights, as they are now."""
        return weights_banner(self.pool)[0]

    def pair_of(self, session: Session | None) -> tuple[str, str]:
        """The visitor's pair (the app's starting pair until the visitor picks another)."""
        return session.pair if session is not None and session.pair else self.pool.start

    def lab_of(self, session: Session | None) -> Lab:
        return self.pool.lab(self.pair_of(session))

    def lab_for(self, result: AnalysisResult) -> Lab:
        """The models of ``result`` (whatever pair the visitor has picked since)."""
        return self.pool.lab(tuple(result.models))

    def _loading(self, pair: Sequence[str]) -> Iterator[dict[Any, Any]]:
        """Load the models of ``pair`` not loaded yet, saying so first (one load at a time; the
        log has how long it took)."""
        for key in self.pool.missing(pair):
            name = self.pool.name(key)
            yield {self.page.compare.status: views.status_html(
                f"Loading {name} (first use: its weights and one warm-up analysis, up to a minute)…", kind="busy")}
            try:
                self.pool.get(key)
            except PairError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            except Exception as exc:  # a weights error, a failed download: said to the visitor
                log.exception("loading %s failed", name)
                raise gr.Error(f"{name} could not be loaded: {exc}", print_exception=False) from None

    def layout(self, pair: Sequence[str]) -> dict[Any, Any]:
        """Everything on the page that names the pair: pickers, headings, colour bar, notes."""
        p, c = self.page, self.page.compare
        words = pair_texts(self.pool, pair)
        out: dict[Any, Any] = {
            c.left: gr.update(value=pair[0], choices=self.pool.choices()),
            c.right: gr.update(value=pair[1], choices=self.pool.choices()),
            c.difference_box: gr.update(label=f"Difference: {words.difference}"),
            c.difference: gr.update(label=words.difference), c.difference_bar: words.difference_bar,
            c.note: gr.update(value=words.note, visible=bool(words.note)),
            p.groups.probe_resnet: gr.update(label=words.probe_left), p.depth.about: words.depth,
            p.correlation.intro: words.correlation}
        for slot, key in zip(("left", "right"), pair, strict=True):
            out[c.images[slot]] = gr.update(label=self.pool.name(key), elem_id=f"overlay-{key}")
            out[c.top5[slot]] = gr.update(elem_id=f"top5-{key}")
            out[c.captions[slot]] = gr.update(elem_id=f"caption-{key}")
        if p.banner is not None:
            out[p.banner] = self.banner()
        return out

    def layout_outputs(self) -> list[Any]:
        """The components :meth:`layout` updates that the analysis does not already."""
        p, c = self.page, self.page.compare
        return [c.left, c.right, c.difference_box, c.difference_bar, c.note, p.groups.probe_resnet, p.depth.about,
                p.correlation.intro, *([p.banner] if p.banner is not None else [])]

    def pick(self, left: str, right: str, path: str | None, method: str, target: str | None, layer: str | None,
             opacity: float, probe_left: bool, faithfulness: bool,
             session: Session | None) -> Iterator[dict[Any, Any]]:
        """A picker changed: load what is new, name the pair everywhere, analyse the picture again."""
        yield from self._at_least_one(self._pick((left, right), path, method, target, layer, opacity, probe_left,
                                                 faithfulness, session))

    def swap(self, left: str, right: str, path: str | None, method: str, target: str | None, layer: str | None,
             opacity: float, probe_left: bool, faithfulness: bool,
             session: Session | None) -> Iterator[dict[Any, Any]]:
        """Left and right change places (the difference changes sign)."""
        yield from self.pick(right, left, path, method, target, layer, opacity, probe_left, faithfulness, session)

    def _pick(self, chosen: tuple[str, str], path: str | None, method: str, target: str | None, layer: str | None,
              opacity: float, probe_left: bool, faithfulness: bool,
              session: Session | None) -> Iterator[dict[Any, Any]]:
        session = session if session is not None else Session()
        before = self.pair_of(session)
        c = self.page.compare
        revert = {c.left: gr.update(value=before[0]), c.right: gr.update(value=before[1])}
        try:
            pair = self.pool.pair(chosen)
            yield from self._loading(pair)
        except (PairError, gr.Error) as exc:
            message = exc.message if isinstance(exc, gr.Error) else str(exc)
            yield {**revert, c.status: views.status_html(str(message), kind="error")}
            return
        if pair == before and (session.result is None or tuple(session.result.models) == pair):  # nothing new
            yield {c.status: gr.skip()}
            return
        session.pair = pair
        log.info("a visitor compares %s", " vs ".join(self.pool.name(k) for k in pair))
        # The old pair's views go with its names: nothing of it stays beside the new headings.
        out = self._cleared(session)
        for component, update in self.layout(pair).items():
            out[component] = {**update, "value": out[component]} if component in out and isinstance(update, dict) \
                else update
        yield {**out, c.status: ""}
        if session.image is not None and path:
            yield from self.analyse(path, method, target, layer, opacity, probe_left, faithfulness, session)
        else:
            yield {c.status: views.status_html("Add a picture and press <b>Analyse</b>.") if session.image is None
                   else views.status_html("Ready: press <b>Analyse</b>.")}
