"""A small API for notebooks (Jupyter, Colab): load the models once, analyse pictures, show each view.

::

    from sanet_viz import notebook

    lab = notebook.load()                       # ResNet50 and SANet50, once (it says when untrained)
    result = lab.analyze("examples/chelsea.jpg")
    result                                      # shows both heatmaps with their top-5
    result.probe()                              # each view is a matplotlib Figure
    lab.figure(["examples/chelsea.jpg", "examples/coffee.jpg"], columns="input,resnet50,sanet50,difference")

It runs exactly what ``python -m sanet_viz analyze`` runs: :meth:`Lab.prepare` then
:func:`sanet_viz.analysis.analyze` with the same :class:`AnalysisOptions`; ``result.to_dict()`` is
the CLI's result.json (without its file names) and ``result.save(folder)`` writes the same files.
Figures are returned closed to pyplot: Jupyter shows the one a cell returns, once.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from . import charts, figures
from .analysis import AnalysisOptions, analyze, faithfulness_verdict
from .lab import Lab
from .preprocessing import ImageInput
from .results import AnalysisResult, ModelResult
from .weights import DEFAULT_MODELS, parse_model_keys, untrained_warning

__all__ = ["load", "NotebookLab", "NotebookResult"]


def _detached(fig: Figure) -> Figure:
    """Forget ``fig`` in pyplot: the inline backend would otherwise draw it a second time."""
    plt.close(fig)
    return fig


def _name(m: ModelResult) -> str:
    return m.display_name if m.weights.pretrained else f"{m.display_name} (UNTRAINED weights)"


def _png(fig: Figure, *, dpi: int = 80) -> bytes:
    return figures.figure_bytes(fig, "png", dpi=dpi, tight=True)


class NotebookResult:
    """One picture's analysis (``.raw``, an :class:`AnalysisResult`) and its views as figures.

    In Jupyter it displays itself as both models' heatmaps with their top-5.
    """

    def __init__(self, raw: AnalysisResult) -> None:
        self.raw = raw

    def __repr__(self) -> str:
        tops = "; ".join(f"{m.display_name}: {m.top5[0].label} {m.top5[0].prob:.1%}" for m in self.raw.models.values())
        note = "" if self.raw.all_pretrained else f" [{untrained_warning(self.raw.untrained)}]"
        return f"<NotebookResult {self.raw.image_name}: {tops}{note}>"

    def _repr_png_(self) -> bytes:
        return _png(charts.overlay_pair(self.raw))

    @property
    def models(self) -> Mapping[str, ModelResult]:
        return self.raw.models

    @property
    def pretrained(self) -> bool:
        return self.raw.all_pretrained

    def cam(self, model: str = "sanet50") -> np.ndarray:
        """The (224, 224) CAM in [0, 1] of ``model`` (a key of the result: ``resnet50``, ``sanet50``, ...)."""
        return self._model(model).cam

    def overlays(self, *, opacity: float = 0.5) -> Figure:
        """Both models' CAMs over the image with their top-5 (the CLI's overlays.png)."""
        return _detached(charts.overlay_pair(self.raw, opacity=opacity))

    def probe(self) -> Figure:
        """The per-group probe at SA_5_3 (the CLI's probe.png); needs ``probe=True``."""
        if not any(m.probe is not None for m in self.raw.models.values()):
            raise ValueError("this result has no probe: analyse with probe=True")
        return _detached(charts.probe_chart(self.raw))

    def groups(self, model: str = "sanet50") -> Figure:
        """The 64 group maps of the probe layer (the CLI's groups.png)."""
        m = self._model(model)
        layer = m.probe.paper_name if m.probe else "layer4.2"
        return _detached(charts.group_grid(m.group_maps, title=f"{_name(m)}: 64 group maps of {layer}"))

    def gates(self, model: str = "sanet50") -> Figure:
        """A gated model's gates across depth (the CLI's gates.png for SANet50: depth x group;
        gates_<key>.png for SE and ECA: the spread over each module's channels)."""
        m = self._model(model)
        if m.sa_gates:
            return _detached(charts.gates_heatmap(m.sa_gates, title=f"{_name(m)}: SA gates across depth"))
        fig = charts.model_gates_chart(m)
        if fig is None:
            raise ValueError(f"{m.display_name} has no attention gates (or the analysis ran with gates=False)")
        return _detached(fig)

    def gates_across_depth(self) -> Figure:
        """Every gated model of the result on one axis of depth, each in its own unit."""
        if not any(m.gates is not None for m in self.raw.models.values()):
            raise ValueError("no gates in this result: no model has attention modules, or gates=False")
        return _detached(charts.gates_across_depth(list(self.raw.models.values())))

    def gates_by_depth(self) -> Figure:
        """SANet50's gates averaged over groups, one point per SA module."""
        m, gates = self._gates()
        fig = charts.gates_lines(gates)
        fig.axes[0].set_title(f"{_name(m)}: mean SA gates by depth", fontsize=9)
        return _detached(fig)

    def faithfulness(self) -> Figure:
        """Deletion and insertion curves of each measured map (``analyze(..., faithfulness=True)``)."""
        measured = {m.display_name: m for m in self.raw.models.values() if m.faithfulness is not None}
        if not measured:
            raise ValueError("no faithfulness measures: analyze(..., faithfulness=True) first")
        return _detached(charts.faithfulness_curves(
            {n: (m.faithfulness.deletion, m.faithfulness.insertion) for n, m in measured.items()},  # type: ignore[union-attr]
            untrained=[n for n, m in measured.items() if not m.weights.pretrained]))

    def verdict(self) -> str | None:
        """One sentence: which map the faithfulness numbers favour, and how far to trust that."""
        return faithfulness_verdict(self.raw)

    def figure(self, *, columns: str | Sequence[str] | None = None, layout: str = "slide",
               opacity: float = 0.5) -> Figure:
        """The comparison figure (``python -m sanet_viz figure``) of this one picture; by default
        the input and each model's map."""
        return figures.result_figure(self.raw, columns=figures.parse_columns(columns) if columns else None,
                                     layout=layout, opacity=opacity)

    def to_dict(self) -> dict[str, Any]:
        """result.json's contract (the CLI's, without file names)."""
        return self.raw.to_dict()

    def save(self, folder: str | Path) -> dict[str, object]:
        """Write what ``analyze`` writes for one picture (result.json, CAMs, pictures) into ``folder``."""
        from .export import write_result

        return write_result(self.raw, folder)

    def _gates(self) -> tuple[ModelResult, dict[str, dict[str, np.ndarray]]]:
        m = self._model("sanet50")
        if not m.sa_gates:
            raise ValueError("no SA gates in this result (analysed with gates=False?)")
        return m, m.sa_gates

    def _model(self, key: str) -> ModelResult:
        if key not in self.raw.models:
            raise ValueError(f"no {key!r} in this result; it has {', '.join(self.raw.models)}")
        return self.raw.models[key]


class NotebookLab:
    """The models, loaded once (``.lab``, a :class:`sanet_viz.lab.Lab`)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def __repr__(self) -> str:
        models = ", ".join(f"{lm.display_name} ({'pretrained' if lm.weights.pretrained else 'UNTRAINED'})"
                           for lm in self.lab.models.values())
        return f"<NotebookLab {models} on {self.lab.device}>"

    @property
    def untrained(self) -> list[str]:
        return self.lab.untrained

    def options(self, *, method: str = "gradcam", target_class: int | None = None, layer: str | None = None,
                precision: str = "auto", probe: bool = True, probe_models: Sequence[str] | None = None,
                probe_batch_size: int = 16, gates: bool = True, faithfulness: bool = False,
                faithfulness_steps: int = 32, faithfulness_randomization: bool = False) -> AnalysisOptions:
        """The :class:`AnalysisOptions` the CLI's flags of the same names make (checked here)."""
        return AnalysisOptions(method=method, target_class=target_class, cam_layer=layer, precision=precision,
                               probe=probe, probe_models=tuple(probe_models) if probe_models else None,
                               probe_batch_size=probe_batch_size, gates=gates,
                               faithfulness=faithfulness or faithfulness_randomization,
                               faithfulness_steps=faithfulness_steps,
                               faithfulness_randomization=faithfulness_randomization,
                               num_classes=min(lm.num_classes for lm in self.lab.models.values()))

    def analyze(self, image: ImageInput, *, name: str | None = None, **options: Any) -> NotebookResult:
        """Analyse one picture (a path, bytes or a PIL image) as ``python -m sanet_viz analyze`` does.

        ``options``: ``method`` ("gradcam"), ``target_class`` (None: each model's top-1), ``layer``
        (None: layer4.2 = SA_5_3; paper names accepted), ``precision`` ("auto", "fp32", "bf16"),
        ``probe`` (True; the probe is most of the time), ``probe_models`` (e.g. ``["sanet50"]``),
        ``probe_batch_size`` (16), ``gates`` (True), ``faithfulness`` (False: deletion, insertion and
        ROAD of each map), ``faithfulness_steps`` (32), ``faithfulness_randomization`` (False).
        """
        label = str(image) if isinstance(image, (str, Path)) else name
        prepared = self.lab.prepare(image, name=label)
        shown = name or (Path(image).name if isinstance(image, (str, Path)) else "image")
        return NotebookResult(analyze(self.lab, prepared, self.options(**options), name=shown))

    def figure(self, images: Sequence[str | Path | NotebookResult], *,
               columns: str | Sequence[str] | None = None, layout: str = "slide",
               opacity: float = 0.5, method: str = "gradcam", target_class: int | None = None,
               layer: str | None = None) -> Figure:
        """The comparison figure (``python -m sanet_viz figure``) of several pictures, one per row.

        ``images``: paths (their CAMs are computed with ``method``, ``target_class`` and ``layer``)
        or results of :meth:`analyze` (drawn as they are).
        """
        columns = figures.parse_columns(columns or ("input", *self.lab.models))
        options = self.options(method=method, target_class=target_class, layer=layer, probe=False, gates=False)
        results = [image.raw if isinstance(image, NotebookResult) else
                   figures.explain_for_figure(self.lab, self.lab.prepare(image, name=str(image)), options,
                                              name=Path(image).name, columns=columns)
                   for image in images]
        return figures.comparison_figure(results, columns=columns, layout=layout, opacity=opacity)


def load(*, models: str | Sequence[str] = DEFAULT_MODELS, resnet50: str | None = None, sanet50: str | None = None,
         specs: Mapping[str, str | None] | None = None, device: str = "auto",
         weights_dir: str | Path | None = None, require_pretrained: bool = False,
         verbose: bool = True) -> NotebookLab:
    """Load the models once (ResNet50 and SANet50 unless ``models`` names others, e.g.
    ``"sanet50,seresnet50"``), with the weights rules of the CLI and the app.

    Arguments are the CLI's ``--models``, ``--resnet50``, ``--sanet50`` (and ``specs={"seresnet50":
    SPEC}`` for the others; SPECs: path, URL, hf://, "untrained"), ``--weights-dir``, ``--device``
    and ``--require-pretrained``. Untrained models are named, with the reason, on stderr
    (``verbose``) and in every result.
    """
    lab = Lab.load(models=parse_model_keys(models), resnet50=resnet50, sanet50=sanet50, specs=specs, device=device,
                   weights_dir=Path(weights_dir) if weights_dir is not None else None,
                   require_pretrained=require_pretrained,
                   log=(lambda m: print(m, file=sys.stderr)) if verbose else None)
    if lab.untrained:
        print(f"warning: {untrained_warning(lab.untrained, subject='results')}", file=sys.stderr)
    return NotebookLab(lab)
