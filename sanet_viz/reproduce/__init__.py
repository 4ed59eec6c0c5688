"""The paper's group analysis at data-set scale (``python -m sanet_viz reproduce``).

Per model (any registered: ResNet50, SANet50, SE-ResNet50, ECA-ResNet50d), over a labelled image
folder: the unmasked top-1 accuracy; the top-1 accuracy of each of the 64 masked inputs of the
SA_5_3 group probe (official semantics: for image x with label y, the masks a_k come from
layer4.2's output chunks, and group k counts when argmax(model(x * a_k)) == y); for every gated
model, the per-class mean gate profiles at every depth in the model's own unit (SA: the channel
and spatial gate of each group; SE, ECA: each channel's gate), their class x class correlation
per depth and the mean between-class correlation against depth, all gated models on one axis
of depth. Models whose preprocessing differs (bicubic for timm's weights) each get their own
tensor of the same crop.

Everything is kept as sums and counts, so the work splits over processes (torchrun: one shard of
the data per rank, no padded duplicates, an all-reduce at the end) and over time (each rank saves
its partial sums atomically under OUT/state every few batches; a rerun continues from there).

Modules: ``classes`` (class maps, label files), ``data`` (scanning, balanced subsets, loading per
rank), ``state`` (checkpoints), ``distributed`` (process group and collectives), ``faithfulness``
(``--faithfulness``: per-image slots, summary, files), ``engine`` (:func:`run`), ``result``
(:class:`ReproduceResult`), ``outputs`` (files). The command line is
``sanet_viz/cli/reproduce.py``; the app's reference profiles are ``sanet_viz/profiles.py``.
"""

from .classes import ClassMap, DatasetError, read_class_map, read_labels
from .data import IMAGE_EXTENSIONS, ImageDataset, Sample, ScannedData, ShardSampler, scan_dataset, select_balanced
from .distributed import init_distributed
from .engine import ReproduceInterrupted, ReproduceOptions, decide_precisions, evaluate_batch, run
from .outputs import group_accuracy_figure, profiles_of, write_outputs
from .result import ReproduceResult
from .state import ReproduceStateError

__all__ = [
    "IMAGE_EXTENSIONS", "ClassMap", "DatasetError", "ImageDataset", "ReproduceInterrupted", "ReproduceOptions",
    "ReproduceResult", "ReproduceStateError", "Sample", "ScannedData", "ShardSampler", "decide_precisions",
    "evaluate_batch", "group_accuracy_figure", "init_distributed", "profiles_of", "read_class_map", "read_labels",
    "run", "scan_dataset", "select_balanced", "write_outputs",
]
