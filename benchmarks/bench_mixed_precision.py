"""How much error does bf16 add in each stage of the probe's masked forwards?

    python benchmarks/bench_mixed_precision.py [--images examples/*.jpg] [--weights calibrated]

For each model (ResNet50, SANet50) and image, the probe's 64 scores are computed on the inference
copy in fp32, then with one stage at a time in bf16 (stem, layer1 .. layer4, fc: the stage's
weights in bf16, its input cast to bf16, its output back to fp32) and with a few combinations.
Each row says the largest |score - fp32 score| over the images and the smallest Spearman
correlation of the 64-group ranking, against the rule that admits bf16 (every score within 0.02,
Spearman >= 0.95: probes.BF16_MAX_ABS_DIFF, BF16_MIN_SPEARMAN). ``--weights calibrated`` (the
default) uses random weights with trained-looking statistics (benchmarks/calibrated.py); untrained
weights saturate the softmax and would say more about that than about bf16.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_analysis import load_lab, load_line, machine_line, weights_line  # noqa: E402

from sanet_viz.analysis import AnalysisOptions, explain  # noqa: E402
from sanet_viz.lab import Lab  # noqa: E402
from sanet_viz.preprocessing import PreparedImage, load_and_prepare  # noqa: E402
from sanet_viz.probes import BF16_MAX_ABS_DIFF, BF16_MIN_SPEARMAN, PrecisionCheck, probe_scores  # noqa: E402

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
COMBINATIONS = {
    "all (= bf16)": STAGES,
    "layer1-layer4": ("layer1", "layer2", "layer3", "layer4"),
    "layer1-layer3": ("layer1", "layer2", "layer3"),
    "layer2-layer4": ("layer2", "layer3", "layer4"),
    "layer3-layer4": ("layer3", "layer4"),
}


class CastStage(nn.Module):
    """A stage run in bf16 between fp32 neighbours: input cast down, output cast back up."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage.to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(x.to(torch.bfloat16)).float()


def mixed_copy(fast: nn.Module, bf16_stages: tuple[str, ...]) -> nn.Module:
    """A copy of the fp32 inference copy ``fast`` with ``bf16_stages`` in bf16."""
    mixed = copy.deepcopy(fast)
    for name in bf16_stages:
        if name == "stem":
            mixed.conv1 = CastStage(nn.Sequential(mixed.conv1, mixed.bn1, mixed.relu, mixed.maxpool))
            mixed.bn1, mixed.relu, mixed.maxpool = nn.Identity(), nn.Identity(), nn.Identity()
        else:
            setattr(mixed, name, CastStage(getattr(mixed, name)))
    return mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", type=Path, default=sorted((ROOT / "examples").glob("*.jpg")))
    parser.add_argument("--weights", default="calibrated", help="untrained, calibrated, or a folder with both "
                        "models' weights files")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    lab = load_lab(args.weights, device="cpu")
    images = [load_and_prepare(p) for p in args.images]
    configs = {f"{s} only": (s,) for s in STAGES} | COMBINATIONS
    print(f"machine: {machine_line(lab.device)}; {load_line()}\nweights: {weights_line(lab)}")
    print(f"{len(images)} images; rule: max |diff| <= {BF16_MAX_ABS_DIFF}, Spearman >= {BF16_MIN_SPEARMAN}\n")
    print("| model | bf16 stages | max abs diff | min Spearman | passes |\n|---|---|---:|---:|---|")
    for key, lm in lab.models.items():
        inputs = [_probe_inputs(lab, key, image) for image in images]
        reference = [_probe(lm.fast_model, *item, args.batch_size) for item in inputs]
        for label, stages in configs.items():
            model = mixed_copy(lm.fast_model, stages)
            checks = [PrecisionCheck.compare(ref, _probe(model, *item, args.batch_size), str(i))
                      for i, (ref, item) in enumerate(zip(reference, inputs, strict=True))]
            print(f"| {lm.display_name} | {label} | {max(c.max_abs_diff for c in checks):.4f} | "
                  f"{min(c.spearman for c in checks):.3f} | {'yes' if all(c.passed for c in checks) else 'no'} |",
                  flush=True)
    print(f"\n{load_line()} at the end")


def _probe_inputs(lab: Lab, key: str, image: PreparedImage) -> tuple[Tensor, Tensor, Tensor]:
    """The image, its group maps at SA_5_3 and its predicted class, from the fp32 CAM pass."""
    result = explain(lab, image, AnalysisOptions(precision="fp32", probe=False), model_keys=(key,)).models[key]
    return image.tensor, torch.from_numpy(result.group_maps)[None], torch.tensor([int(result.logits.argmax())])


def _probe(model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor, batch_size: int) -> Tensor:
    scores, _ = probe_scores(model, x, maps, classes, batch_size=batch_size, precision="fp32", channels_last=True)
    return scores[0]


if __name__ == "__main__":
    main()
