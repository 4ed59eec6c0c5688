"""Paper-style comparison figures for slides and handouts, and vector output with text kept as text.

A comparison figure has one row per image and, by default, three columns: the input (the 224x224
centre crop the models see), the first model's CAM over it and the second's (ResNet50 and SANet50
unless other registered models are named), optionally their difference. Every map is titled with
the class it explains and that class's softmax probability; the CAMs share one colour bar on
[0, 1], the difference (the second model's map minus the first's, on [-1, 1]) has its own
diverging one. A figure of untrained models says so in red above the maps.

Geometry is computed in inches (:class:`Layout`), so nothing depends on a renderer's guesses:
``slide`` is a 16:9 slide (13.33 x 7.5 in, PowerPoint's default), ``page`` is the text block of
an A4 page (170 x 240 mm). Figures are built on :class:`matplotlib.figure.Figure` directly, not
through pyplot, so a server that makes many of them keeps none alive.
"""

from __future__ import annotations

import io
import itertools
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from . import charts, models
from .analysis import explain
from .cam import CAM_METHODS
from .lab import Lab
from .preprocessing import PreparedImage
from .results import AnalysisOptions, AnalysisResult, ModelResult
from .weights import DEFAULT_MODELS, MODEL_SPECS, untrained_warning

__all__ = ["COLUMNS", "ALL_COLUMNS", "DEFAULT_COLUMNS", "DIFF_CMAP", "FORMATS", "LAYOUTS", "Layout", "parse_columns",
           "models_for", "explain_for_figure", "comparison_figure", "result_figure", "max_images", "text_as_text",
           "figure_bytes", "svg_bytes", "save_figure"]

MODEL_COLUMNS = DEFAULT_MODELS  # the default pair
COLUMNS = ("input", *MODEL_COLUMNS, "difference")  # every column of the default pair's figure
ALL_COLUMNS = ("input", *MODEL_SPECS, "difference")  # any registered model may be a column
DEFAULT_COLUMNS = ("input", "resnet50", "sanet50")
DIFF_CMAP = "RdBu_r"  # red: the second model's map is higher; blue: the first's
FORMATS = ("pdf", "svg", "png")
# Text stays text: SVG <text> elements instead of glyph paths; TrueType (Type 42) fonts in PDF
# and PostScript instead of Type 3, so the words can be searched, selected and edited.
_TEXT_AS_TEXT = {"svg.fonttype": "none", "pdf.fonttype": 42, "ps.fonttype": 42}
_POINT = 1 / 72  # inches
_CHAR_WIDTH = 0.6  # of the font size: a generous average for DejaVu Sans, so estimates never overflow
_BOLD = 1.12  # bold glyphs are about this much wider
_UNTRAINED_COLOUR = "#b00020"


@dataclass(frozen=True)
class Layout:
    """A box the figure must fit, and the font sizes it is read at."""

    name: str
    width: float  # inches
    height: float  # inches, the most the figure may take
    font: float  # points, of headers and notes; map titles and colour bars are 90% of it
    min_font: float  # fonts shrink towards this when maps would be smaller than ``min_map``
    min_map: float  # inches
    fill_height: bool  # True: the figure is the whole box (a slide); False: as tall as its content


LAYOUTS: dict[str, Layout] = {
    "slide": Layout("slide", 13.333, 7.5, font=13.0, min_font=10.0, min_map=1.6, fill_height=True),
    "page": Layout("page", 170 / 25.4, 240 / 25.4, font=8.0, min_font=6.0, min_map=1.1, fill_height=False),
}


def parse_columns(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"input,resnet50,sanet50,difference"`` (or a sequence) -> checked column names, in order."""
    names = [c.strip().lower() for c in (text.split(",") if isinstance(text, str) else text) if c.strip()]
    unknown = [c for c in names if c not in ALL_COLUMNS]
    if unknown or not names:
        raise ValueError(f"unknown figure column(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(ALL_COLUMNS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a figure column appears twice in {','.join(names)}")
    return tuple(names)


def models_for(columns: Sequence[str], pair: Sequence[str] = DEFAULT_MODELS) -> tuple[str, ...]:
    """The models the columns show, the ``pair`` first in its order (the difference needs both of
    it: the second's map minus the first's)."""
    shown = [c for c in columns if c in MODEL_SPECS]
    if "difference" in columns:
        strangers = [c for c in shown if c not in pair]
        if strangers or len(pair) != 2:
            raise ValueError(f"the difference column compares {' and '.join(pair)}; the columns also name "
                             f"{', '.join(strangers)}" if strangers else "the difference column needs two models")
        shown += list(pair)
    return tuple(k for k in pair if k in shown) + tuple(dict.fromkeys(k for k in shown if k not in pair))


def _pair_of(result: AnalysisResult) -> tuple[str, ...]:
    """The result's two models in analysis order (the difference: second minus first), else the default."""
    return tuple(result.models) if len(result.models) == 2 else DEFAULT_MODELS


def explain_for_figure(lab: Lab, image: PreparedImage, options: AnalysisOptions, *, name: str,
                       columns: Sequence[str] = DEFAULT_COLUMNS) -> AnalysisResult:
    """The CAM pass (:func:`analysis.explain`) of the models the columns show: no probe, no gates."""
    keys = models_for(columns, tuple(lab.models) if len(lab.models) == 2 else DEFAULT_MODELS)
    missing = [k for k in keys if k not in lab.models]
    if missing:
        raise ValueError(f"the figure's columns need {', '.join(missing)}, which this lab has not loaded")
    return explain(lab, image, replace(options, probe=False, gates=False), name=name, model_keys=keys)


# ---------------------------------------------------------------------------------------------
# Texts: what the figure says, known before it is laid out


@dataclass(frozen=True)
class _Bar:
    columns: tuple[int, ...]  # columns (within a block) it belongs to; it spans them when drawn below
    cmap: str
    limits: tuple[float, float]
    ticks: tuple[float, ...]
    label: str


@dataclass(frozen=True)
class _Texts:
    notes: list[tuple[str, str]]  # paragraphs above the grid, with their colours
    headers: list[tuple[str, str]]  # one per column
    bars: list[_Bar]


def _probability(m: ModelResult, index: int) -> float:
    """softmax(logits)[index] of the unmasked image, computed stably in float64."""
    z = m.logits.astype(np.float64)
    z = z - z.max()
    return float(np.exp(z[index]) / np.exp(z).sum())


def _method_label(method: str) -> str:
    return CAM_METHODS[method][1].split(" (")[0]


def _caption(method: str, layer: str, target: int | None) -> str:
    paper = models.paper_name_or_none(layer)
    where = f"{layer} ({paper})" if paper else layer
    explained = (f"both maps explain class {target}" if target is not None
                 else "each map explains its model's top-1 class")
    return f"{_method_label(method)} at {where}; {explained} (name and probability above it)"


def _column_header(column: str, names: dict[str, str], untrained: set[str],
                   pair: Sequence[str]) -> tuple[str, str]:
    if column == "input":
        return "input", "black"
    if column == "difference":
        return f"{names[pair[1]]} − {names[pair[0]]}", "black"
    if column in untrained:
        return f"{names[column]} (UNTRAINED)", _UNTRAINED_COLOUR
    return names[column], "black"


def _bars(columns: Sequence[str], method: str, names: dict[str, str], pair: Sequence[str]) -> list[_Bar]:
    cams = tuple(i for i, c in enumerate(columns) if c in MODEL_SPECS)
    if "difference" in columns and cams and min(cams) < columns.index("difference") < max(cams):
        cams = (cams[0],)  # a bar spanning the difference column would read as its scale
    bars = []
    if cams:
        bars.append(_Bar(cams, charts.CAM_CMAP, (0.0, 1.0), (0.0, 0.5, 1.0),
                         f"{_method_label(method)}: 0 = least, 1 = most relevant to the class explained"))
    if "difference" in columns:
        second, first = names[pair[1]], names[pair[0]]
        bars.append(_Bar((columns.index("difference"),), DIFF_CMAP, (-1.0, 1.0), (-1.0, 0.0, 1.0),
                         f"{second} − {first} (red: {second} higher; blue: {first} higher)"))
    return bars


def _texts(results: Sequence[AnalysisResult], columns: Sequence[str]) -> _Texts:
    first = next(iter(results[0].models.values()))
    names = {key: spec.display_name for key, spec in MODEL_SPECS.items()}
    names.update({key: m.display_name for r in results for key, m in r.models.items()})
    untrained_keys = {key for r in results for key, m in r.models.items() if not m.weights.pretrained}
    untrained = list(dict.fromkeys(n for r in results for n in r.untrained))
    notes = [(untrained_warning(untrained, subject="these maps"), _UNTRAINED_COLOUR)] if untrained else []
    notes.append((_caption(first.cam_method, first.cam_layer, results[0].options.target_class), "#333333"))
    pair = _pair_of(results[0])
    return _Texts(notes, [_column_header(c, names, untrained_keys, pair) for c in columns],
                  _bars(columns, first.cam_method, names, pair))


def _worst_texts(columns: Sequence[str], pair: Sequence[str] = DEFAULT_MODELS) -> _Texts:
    """The longest texts a figure of these columns can have: for checking the size before any work."""
    names = {key: spec.display_name for key, spec in MODEL_SPECS.items()}
    longest = max(CAM_METHODS, key=lambda m: len(_method_label(m)))
    shown = models_for(columns, pair)
    notes = [(untrained_warning([names[k] for k in shown], subject="these maps"), _UNTRAINED_COLOUR),
             (_caption(longest, "layer4.2", None), "#333333")]
    return _Texts(notes, [_column_header(c, names, set(MODEL_SPECS), pair) for c in columns],
                  _bars(columns, longest, names, pair))


# ---------------------------------------------------------------------------------------------
# Geometry (inches; y grows upwards as in matplotlib). Many images are laid out in blocks side by
# side (images 1-4 in the first block, 5-8 in the second ...), each block with the figure's columns.

_MARGIN, _GAP, _BLOCK_GAP, _BAR = 0.12, 0.1, 0.3, 0.13  # figure margin, gaps, colour bar thickness
_MIN_TITLE_CHARS = 8  # a map narrower than this many title characters is not legible


@dataclass(frozen=True)
class _Geometry:
    width: float
    height: float
    font: float
    blocks: int
    rows: int  # per block
    cols: int  # per block
    map_size: float
    title: float  # the two title lines above each map
    left: float  # x of the first column
    top: float  # y of the first row's maps' top edge
    notes: list[tuple[str, str]]  # wrapped lines above the column headers: (text, colour)
    header_lines: int  # of the column headers
    bars_right: bool  # colour bars right of the grid (True) or below it (False)
    bar_block: float  # width (right) or height (below) of one colour bar with its ticks and label

    def column_x(self, block: int, col: int) -> float:
        block_w = self.cols * (self.map_size + _GAP) - _GAP + _BLOCK_GAP
        return self.left + block * block_w + col * (self.map_size + _GAP)

    def cell(self, image: int, col: int) -> tuple[float, float, float, float]:
        """Axes rectangle of image ``image``'s map in column ``col``, in inches: (x, y, w, h)."""
        block, row = divmod(image, self.rows)
        y = self.top - row * (self.map_size + self.title + _GAP) - self.map_size
        return self.column_x(block, col), y, self.map_size, self.map_size

    @property
    def grid_right(self) -> float:
        return self.column_x(self.blocks - 1, self.cols - 1) + self.map_size

    @property
    def grid_bottom(self) -> float:
        return self.cell(self.rows - 1, 0)[1]

    @property
    def legible(self) -> bool:
        return self.map_size >= _MIN_TITLE_CHARS * _CHAR_WIDTH * 0.9 * self.font * _POINT

    def fraction(self, x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        return x / self.width, y / self.height, w / self.width, h / self.height


def _line(font: float) -> float:
    return 1.3 * font * _POINT


def _chars(width: float, font: float) -> int:
    return max(1, int(width / (_CHAR_WIDTH * font * _POINT)))


def _wrap(text: str, width: float, font: float) -> list[str]:
    return textwrap.wrap(text, _chars(width, font)) or [""]


def _bar_span(bar: _Bar, map_size: float, grid_height: float, right: bool) -> float:
    """Length of a drawn colour bar's long side (its label wraps to it)."""
    if right:
        return 0.8 * grid_height
    return 0.8 * (len(bar.columns) * (map_size + _GAP) - _GAP)


def _fit(box: Layout, texts: _Texts, images: int, blocks: int, right: bool) -> _Geometry:
    """The largest square maps that fit ``box`` in ``blocks`` blocks, colour bars right or below.

    Wrapped text depends on the map size and the map size on the text: rounds repeat until a
    round changes nothing (line counts only grow and fonts only shrink, so it settles).
    """
    rows, cols, bars = -(-images // blocks), len(texts.headers), texts.bars
    font, label_lines, size = box.font, 1, box.width / (cols * blocks)
    for _ in range(12):
        before = (font, label_lines, size)
        notes = [(line, colour) for text, colour in texts.notes
                 for line in _wrap(text, box.width - 2 * _MARGIN, font)]
        small = 0.9 * font
        title = 2 * _line(small) + 0.06
        header_lines = max(len(_wrap(text, size, _BOLD * font)) for text, _ in texts.headers)
        head_h = (len(notes) + header_lines) * _line(font) + 0.1
        block = _BAR + 0.05 + (1 + label_lines) * _line(small) + 0.12  # bar, ticks, label, space
        extra_w = len(bars) * (block + 3 * _CHAR_WIDTH * small * _POINT) if right else 0.0
        extra_h = block + 0.08 if (bars and not right) else 0.0
        free_w = box.width - 2 * _MARGIN - extra_w - (blocks - 1) * _BLOCK_GAP - (cols * blocks - 1) * _GAP
        by_height = (box.height - 2 * _MARGIN - head_h - extra_h - rows * title - (rows - 1) * _GAP) / rows
        size = max(0.05, min(free_w / (cols * blocks), by_height))
        grid_h = rows * (size + title) + (rows - 1) * _GAP - title
        label_lines = max([label_lines] + [len(_wrap(b.label, _bar_span(b, size, grid_h, right), small))
                                           for b in bars])
        if size < box.min_map and font > box.min_font:
            font = max(box.min_font, font * size / box.min_map)
        if before[:2] == (font, label_lines) and abs(before[2] - size) < 1e-4:
            break
    content_w = blocks * (cols * (size + _GAP) - _GAP) + (blocks - 1) * _BLOCK_GAP + extra_w
    content_h = head_h + rows * (title + size) + (rows - 1) * _GAP + extra_h
    height = box.height if box.fill_height else min(box.height, content_h + 2 * _MARGIN)
    top = height - max(_MARGIN, (height - content_h) / 2)
    return _Geometry(width=box.width, height=height, font=font, blocks=blocks, rows=rows, cols=cols,
                     map_size=size, title=title, left=(box.width - content_w) / 2, top=top - head_h - title,
                     notes=notes, header_lines=header_lines, bars_right=right, bar_block=block)


def _arrange(box: Layout, texts: _Texts, images: int) -> _Geometry:
    """The arrangement with the largest maps: one block or several side by side; colour bars below
    a wide grid or right of a tall one (ties: fewer blocks, bars below)."""
    blockings = sorted({-(-images // rows) for rows in range(1, images + 1)})  # distinct row counts
    options = [_fit(box, texts, images, blocks, right) for blocks in blockings
               for right in ((False, True) if texts.bars else (False,))]
    return max(options, key=lambda g: (round(g.map_size, 3), -g.blocks, -g.bars_right))


def max_images(*, columns: Sequence[str] = DEFAULT_COLUMNS, layout: str | Layout = "slide",
               pair: Sequence[str] = DEFAULT_MODELS) -> int:
    """How many images one figure of these columns holds legibly in ``layout`` (at most 200)."""
    box = LAYOUTS[layout] if isinstance(layout, str) else layout
    texts = _worst_texts(parse_columns(columns), pair)
    low, high = 1, 200  # legibility falls with the image count: bisect
    if not _arrange(box, texts, 1).legible:
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _arrange(box, texts, mid).legible else (low, mid - 1)
    return low


# ---------------------------------------------------------------------------------------------
# Drawing


def _diff_overlay(display: np.ndarray, diff: np.ndarray, *, opacity: float) -> np.ndarray:
    """The difference on [-1, 1] over a grey copy of the image, as ``charts.overlay`` blends CAMs."""
    grey = display.astype(np.float64).mean(-1, keepdims=True) / 255.0
    heat = matplotlib.colormaps[DIFF_CMAP](np.clip((diff + 1.0) / 2.0, 0.0, 1.0))[..., :3]
    return (np.clip((1.0 - opacity) * grey + opacity * heat, 0, 1) * 255).round().astype(np.uint8)


def _cell_title(result: AnalysisResult, column: str, width: float, font: float) -> tuple[str, str]:
    """Two lines above a map: what it shows, and a number (colour: red for untrained models)."""
    limit = _chars(width, font)

    def fit(text: str) -> str:
        return text if len(text) <= limit else text[: limit - 1] + "…"

    if column == "input":
        w, h = result.original_size
        return fit(Path(result.image_name).name) + "\n" + fit(f"crop of {w}x{h}"), "black"
    if column == "difference":
        a, b = (result.models[k] for k in _pair_of(result))
        same = a.target_class == b.target_class
        return fit("same class" if same else "classes differ") + "\n" + \
            fit(f"max |Δ| {np.abs(b.cam - a.cam).max():.2f}"), "black" if same else _UNTRAINED_COLOUR
    m = result.models[column]
    colour = "black" if m.weights.pretrained else _UNTRAINED_COLOUR
    return fit(m.target_label) + "\n" + fit(f"p = {_probability(m, m.target_class):.1%}"), colour


def _draw_cell(fig: Figure, rect: tuple[float, float, float, float], result: AnalysisResult, column: str,
               *, opacity: float, geometry: _Geometry) -> None:
    ax = fig.add_axes(rect)
    if column == "input":
        picture = result.display
    elif column == "difference":
        a, b = (result.models[k] for k in _pair_of(result))
        picture = _diff_overlay(result.display, b.cam - a.cam, opacity=opacity)
    else:
        picture = charts.overlay(result.display, result.models[column].cam, opacity=opacity)
    ax.imshow(picture, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    title, colour = _cell_title(result, column, geometry.map_size, 0.9 * geometry.font)
    ax.set_title(title, fontsize=0.9 * geometry.font, color=colour, pad=4, linespacing=1.15)


def _draw_headers(fig: Figure, texts: _Texts, g: _Geometry) -> None:
    y = g.top + g.title + g.header_lines * _line(g.font) + 0.04  # just above the column headers
    for text, colour in reversed(g.notes):
        fig.text(0.5, y / g.height, text, ha="center", va="bottom", fontsize=g.font, color=colour)
        y += _line(g.font)
    for block, (col, (text, colour)) in itertools.product(range(g.blocks), enumerate(texts.headers)):
        x = g.column_x(block, col) + g.map_size / 2
        fig.text(x / g.width, (g.top + g.title + 0.04) / g.height, "\n".join(_wrap(text, g.map_size, _BOLD * g.font)),
                 ha="center", va="bottom", fontsize=g.font, fontweight="bold", color=colour, linespacing=1.1)


def _draw_bars(fig: Figure, bars: Sequence[_Bar], g: _Geometry) -> None:
    small = 0.9 * g.font
    grid_h = g.top - g.grid_bottom
    for i, bar in enumerate(bars):
        span = _bar_span(bar, g.map_size, grid_h, g.bars_right)
        if g.bars_right:
            x = g.grid_right + 0.2 + i * (g.bar_block + 3 * _CHAR_WIDTH * small * _POINT)
            rect = (x, g.grid_bottom + (grid_h - span) / 2, _BAR, span)
        else:  # under the first block's columns it belongs to
            first = g.column_x(0, min(bar.columns))
            whole = len(bar.columns) * (g.map_size + _GAP) - _GAP
            rect = (first + (whole - span) / 2, g.grid_bottom - 0.1 - _BAR, span, _BAR)
        cax = fig.add_axes(g.fraction(*rect))
        mappable = ScalarMappable(norm=Normalize(*bar.limits), cmap=bar.cmap)
        cb = fig.colorbar(mappable, cax=cax, orientation="vertical" if g.bars_right else "horizontal",
                          ticks=list(bar.ticks))
        cb.ax.tick_params(labelsize=small, length=2, pad=1)
        cb.outline.set_linewidth(0.5)
        cb.set_label("\n".join(_wrap(bar.label, span, small)), fontsize=small, linespacing=1.15)


def comparison_figure(results: Sequence[AnalysisResult], *, columns: Sequence[str] = DEFAULT_COLUMNS,
                      layout: str | Layout = "slide", opacity: float = 0.5) -> Figure:
    """Rows = ``results`` (one image each), columns as named (see :data:`COLUMNS`).

    The results must hold the models their columns show, computed with one CAM method and layer
    (as :func:`explain_for_figure` makes them). More images than fit one column of rows go into
    blocks side by side; more than :func:`max_images` is an error. Returns a figure not
    registered with pyplot.
    """
    columns = parse_columns(columns)
    box = LAYOUTS[layout] if isinstance(layout, str) else layout
    if not results:
        raise ValueError("a figure needs at least one result")
    for r in results:
        missing = [k for k in models_for(columns, _pair_of(r)) if k not in r.models]
        if missing:
            raise ValueError(f"{r.image_name}: no {', '.join(missing)} in this result, which the columns need")
    texts = _texts(results, columns)
    g = _arrange(box, texts, len(results))
    if not g.legible:
        raise ValueError(f"{len(results)} images do not fit one {box.name} figure of {len(columns)} columns "
                         f"legibly (maps would be {g.map_size:.2f} in wide); at most "
                         f"{max_images(columns=columns, layout=box, pair=_pair_of(results[0]))} do: make several "
                         "figures")
    fig = Figure(figsize=(g.width, g.height))
    _draw_headers(fig, texts, g)
    for image, result in enumerate(results):
        for col, column in enumerate(columns):
            _draw_cell(fig, g.fraction(*g.cell(image, col)), result, column, opacity=opacity, geometry=g)
    _draw_bars(fig, texts.bars, g)
    return fig


def result_figure(result: AnalysisResult, *, columns: Sequence[str] | None = None,
                  layout: str | Layout = "slide", opacity: float = 0.5) -> Figure:
    """The comparison figure of one already computed result (e.g. the app's current image); by
    default the input and each of its models."""
    return comparison_figure([result], columns=columns or ("input", *result.models), layout=layout, opacity=opacity)


# ---------------------------------------------------------------------------------------------
# Output


@contextmanager
def text_as_text() -> Iterator[None]:
    """While saving: SVG text as <text> elements, PDF/PS fonts as TrueType (searchable, editable)."""
    with matplotlib.rc_context(_TEXT_AS_TEXT):
        yield


def figure_bytes(fig: Figure, fmt: str, *, dpi: float = 200, close: bool = True, tight: bool = False) -> bytes:
    """``fig`` as PDF, SVG or PNG bytes with text kept as text.

    ``close`` drops it from pyplot too; ``tight`` crops to what is drawn (the comparison figure's
    size is part of its layout: leave it off there).
    """
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    buffer = io.BytesIO()
    with text_as_text():
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=_metadata(fmt), bbox_inches="tight" if tight else None)
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)  # a no-op for figures pyplot does not know
    return buffer.getvalue()


def _metadata(fmt: str) -> dict[str, str | None]:
    # No creation date in PDF/SVG: the same figure gives the same bytes (diffable, cacheable).
    if fmt == "pdf":
        return {"CreationDate": None, "Creator": "sanet-viz"}
    if fmt == "svg":
        return {"Date": None, "Creator": "sanet-viz"}
    return {"Software": "sanet-viz"}


def svg_bytes(fig: Figure, *, close: bool = True, tight: bool = False) -> bytes:
    """Any matplotlib figure (e.g. a ``charts`` view) as SVG with <text> elements."""
    return figure_bytes(fig, "svg", close=close, tight=tight)


def save_figure(fig: Figure, path: str | Path, *, dpi: float = 200, close: bool = True) -> Path:
    """Write ``fig`` to ``path``; the format is the suffix (.pdf, .svg or .png; ``dpi`` for PNG)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    data = figure_bytes(fig, fmt, dpi=dpi, close=close)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
