"""The Class correlation tab's handler (a mixin of :class:`handlers.Handlers`): the gates of every
gated model of the visitor's pair (SA, SE, ECA) for several images, and the class x class
correlation at every depth, undefined where it is."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from .. import charts
from ..analysis import AnalysisOptions, explain
from ..correlation import ClassCorrelation, class_correlation
from ..preprocessing import ImageDecodeError
from . import views
from .pairs import correlation_headers
from .session import Session

if TYPE_CHECKING:
    from ..lab import Lab

__all__ = ["CorrelationHandlers"]


class CorrelationHandlers:
    settings: Any
    page: Any
    lab_of: Callable[[Session | None], Lab]

    def correlate(self, files: Sequence[str] | None, labels_text: str,
                  session: Session | None = None) -> dict[Any, Any]:
        """The gates of every gated model of the visitor's pair (an API call: the starting pair) for
        several images, and the class x class correlation at every depth, per model.

        One label per image for every model: the one given, else the first gated model's top-1.
        ``numbers`` keeps that first model's correlation at its top level (SANet50's by default)
        and has every gated model's under ``models``.
        """
        files = list(files or [])
        if len(files) < 2:
            raise gr.Error("Upload at least two images (of at least two classes).", print_exception=False)
        if len(files) > self.settings.max_correlation_images:
            raise gr.Error(f"At most {self.settings.max_correlation_images} images at once.", print_exception=False)
        lab = self.lab_of(session)
        gated = tuple(k for k, lm in lab.models.items() if lm.has_gates)
        if not gated:
            raise gr.Error("Neither model of this pair has attention gates to correlate: pick one that has "
                           "(SANet50, SE-ResNet50, ECA-ResNet50d).", print_exception=False)
        given = [line.strip() for line in (labels_text or "").splitlines()]
        gates: dict[str, list[Any]] = {k: [] for k in gated}
        labels, rows, skipped = [], [], []
        for i, path in enumerate(files):
            name = Path(path).name
            try:
                image = lab.prepare(path, limits=self.settings.limits, name=name)
            except ImageDecodeError as exc:
                skipped.append(str(exc))
                continue
            result = explain(lab, image, AnalysisOptions(probe=False), model_keys=gated, name=name).models
            predicted = result[gated[0]].top5[0]
            labels.append(given[i] if i < len(given) and given[i] else f"{predicted.index}: {predicted.label}")
            for key in gated:
                gates[key].append(result[key].gates.values)  # type: ignore[union-attr]
            rows.append([name, labels[-1], *(f"{p.index}: {p.label} ({p.prob:.1%})"
                                             for p in (result[k].top5[0] for k in gated))])
        if len(rows) < 2:
            raise gr.Error("Fewer than two of the files are pictures that can be analysed. " + "; ".join(skipped),
                           print_exception=False)
        if len(set(labels)) < 2:
            raise gr.Error("The images fall into fewer than two classes: add images of another class or give "
                           "labels (one per line, in upload order).", print_exception=False)
        corrs = {k: class_correlation(gates[k], labels) for k in gated}
        names = {k: lab.models[k].display_name for k in gated}
        untrained = [names[k] for k in gated if not lab.models[k].weights.pretrained]
        c, first = self.page.correlation, corrs[gated[0]]
        classes = [str(x) for x in first.classes]
        if len(gated) == 1 and lab.models[gated[0]].gate_layout.kind == "SA":  # type: ignore[union-attr]
            line = charts.to_image(charts.correlation_vs_depth(first))  # as before other models could be picked
            matrices = charts.to_image(charts.correlation_matrices(first, class_names=classes))
        else:
            kinds = {names[k]: lab.models[k].gate_layout.kind for k in gated}  # type: ignore[union-attr]
            line = views.correlation_depth_image({names[k]: corrs[k] for k in gated}, kinds=kinds, untrained=untrained)
            matrices = views.stacked([views.titled(charts.correlation_matrices(corrs[k], class_names=classes),
                                                   f"{names[k]} ({kinds[names[k]]} gates)")
                                      for k in gated], centre=True)
        return {c.line: line, c.matrices: matrices,
                c.table: {"headers": correlation_headers(list(names.values())), "data": rows},
                c.message: self._correlation_note({names[k]: corrs[k] for k in gated}, untrained, len(rows), skipped),
                c.numbers: {**first.to_dict(), "models": {k: corrs[k].to_dict() for k in gated}}}

    @staticmethod
    def _correlation_note(corrs: dict[str, ClassCorrelation], untrained: list[str], images: int,
                          skipped: list[str]) -> str:
        first = next(iter(corrs.values()))
        note = [f"{images} images, {len(first.classes)} classes."]
        for name, corr in corrs.items():
            undefined = [d for d in corr.depths if not corr.defined(d)]
            if undefined:
                reasons = sorted({corr.notes[d] for d in undefined})
                who = f"{name}: " if len(corrs) > 1 else ""
                note.append(f"{who}**Undefined at {len(undefined)} of {len(corr.depths)} depths** (greyed): "
                            + "; ".join(reasons) + ".")
        note += [f"**{name} is untrained**: these gates are not the published model's." for name in untrained]
        if skipped:
            note.append("Skipped: " + "; ".join(skipped))
        return "\n\n".join(note)
