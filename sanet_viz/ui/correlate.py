"""The Class correlation tab's handler (a mixin of :class:`handlers.Handlers`): SANet50's gates
for several images and the class x class correlation at every depth, undefined where it is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from .. import charts
from ..analysis import AnalysisOptions, explain
from ..correlation import class_correlation
from ..preprocessing import ImageDecodeError

if TYPE_CHECKING:
    from ..lab import Lab

__all__ = ["CorrelationHandlers"]


class CorrelationHandlers:
    lab: Lab
    settings: Any
    page: Any


    def correlate(self, files: Sequence[str] | None, labels_text: str) -> dict[Any, Any]:
        """SANet50's gates for several images, and the class x class correlation at every depth."""
        files = list(files or [])
        if len(files) < 2:
            raise gr.Error("Upload at least two images (of at least two classes).", print_exception=False)
        if len(files) > self.settings.max_correlation_images:
            raise gr.Error(f"At most {self.settings.max_correlation_images} images at once.", print_exception=False)
        given = [line.strip() for line in (labels_text or "").splitlines()]
        gates, labels, rows, skipped = [], [], [], []
        for i, path in enumerate(files):
            name = Path(path).name
            try:
                image = self.lab.prepare(path, limits=self.settings.limits, name=name)
            except ImageDecodeError as exc:
                skipped.append(str(exc))
                continue
            sanet = explain(self.lab, image, AnalysisOptions(probe=False), model_keys=("sanet50",),
                            name=name).models["sanet50"]
            predicted = sanet.top5[0]
            label = given[i] if i < len(given) and given[i] else f"{predicted.index}: {predicted.label}"
            gates.append(sanet.sa_gates)
            labels.append(label)
            rows.append([name, label, f"{predicted.index}: {predicted.label} ({predicted.prob:.1%})"])
        if len(rows) < 2:
            raise gr.Error("Fewer than two of the files are pictures that can be analysed. " + "; ".join(skipped),
                           print_exception=False)
        if len(set(labels)) < 2:
            raise gr.Error("The images fall into fewer than two classes: add images of another class or give "
                           "labels (one per line, in upload order).", print_exception=False)
        corr = class_correlation(gates, labels)
        c = self.page.correlation
        matrices = charts.correlation_matrices(corr, class_names=[str(x) for x in corr.classes])
        return {c.line: charts.to_image(charts.correlation_vs_depth(corr)), c.matrices: charts.to_image(matrices),
                c.table: rows, c.message: self._correlation_note(corr, len(rows), skipped),
                c.numbers: corr.to_dict()}

    def _correlation_note(self, corr: Any, images: int, skipped: list[str]) -> str:
        note = [f"{images} images, {len(corr.classes)} classes."]
        undefined = [d for d in corr.depths if not corr.defined(d)]
        if undefined:
            reasons = sorted({corr.notes[d] for d in undefined})
            note.append(f"**Undefined at {len(undefined)} of {len(corr.depths)} depths** (greyed): "
                        + "; ".join(reasons) + ".")
        if any(not lm.weights.pretrained for key, lm in self.lab.models.items() if key == "sanet50"):
            note.append("**SANet50 is untrained**: these gates are not the published model's.")
        if skipped:
            note.append("Skipped: " + "; ".join(skipped))
        return "\n\n".join(note)
