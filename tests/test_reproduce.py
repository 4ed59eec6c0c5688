"""`reproduce`: the group analysis over a labelled folder, split over processes and over time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, randomize_sa
from PIL import Image
from torchvision.models import resnet as tv_resnet

from sanet_viz import models
from sanet_viz import reproduce as rp
from sanet_viz.analysis import AnalysisOptions, analyze
from sanet_viz.correlation import class_correlation
from sanet_viz.lab import Lab, LoadedModel, bf16_supported
from sanet_viz.preprocessing import decode_image, prepare
from sanet_viz.probes import PrecisionCheck
from sanet_viz.profiles import load_profiles, nearest_classes_for
from sanet_viz.weights import WeightsInfo

NUM_CLASSES = 5
GROUPS = 8  # probe groups of the tiny models (layer4.0 has 128 channels)
PLANES = (4, 8, 16, 32)
CLASSES = (0, 2, 3)  # folder names (class indices)
WNIDS = {0: "n01440764", 2: "n01484850", 3: "n01491361"}


class TinyResNet(models.SAResNet):
    """The tiny SA-ResNet's layout with torchvision's plain Bottleneck: the ResNet50 slot."""

    def _make_layer(self, planes: int, blocks: int, stride: int, sa_groups: int) -> torch.nn.Sequential:
        out_channels = planes * 4
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = torch.nn.Sequential(tv_resnet.conv1x1(self.inplanes, out_channels, stride),
                                             torch.nn.BatchNorm2d(out_channels))
        layers = [tv_resnet.Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_channels
        layers += [tv_resnet.Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return torch.nn.Sequential(*layers)


def tiny_lab() -> Lab:
    info = WeightsInfo("tiny test model (random)", False, None, "test")
    torch.manual_seed(1)
    plain = randomize_sa(TinyResNet([1, 1, 1, 1], num_classes=NUM_CLASSES, planes=PLANES), 1).eval()
    torch.manual_seed(0)  # like conftest's tiny_sa_resnet, narrower: the probe runs 9 x 8 forwards per model
    sa = randomize_sa(models.SAResNet([1, 1, 1, 1], num_classes=NUM_CLASSES, sa_groups=4, planes=PLANES), 0).eval()
    return Lab({
        "resnet50": LoadedModel("resnet50", "TinyResNet", plain, info, probe_layer="layer4.0", probe_groups=GROUPS),
        "sanet50": LoadedModel("sanet50", "TinySANet", sa, info, probe_layer="layer4.0", probe_groups=GROUPS),
    })


def make_folder(root: Path, names: dict[int, str] | None = None, *, broken: bool = True) -> Path:
    """3 classes x 3 random pictures (class-tinted so that random networks disagree), one broken file."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        folder = root / (names[c] if names else str(c))
        folder.mkdir(parents=True)
        for i in range(3):
            h, w = 230 + 17 * i, 250 + 31 * c
            pixels = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
            pixels[..., c % 3] = pixels[..., c % 3] * 0.3 + 170
            pixels[: h // 2, : w // 3] *= 0.2 + 0.3 * i
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img{i}.{'png' if i else 'jpg'}")
    if broken:
        (root / str(CLASSES[1]) if not names else root / names[CLASSES[1]]).joinpath("zz_broken.jpg").write_bytes(
            b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


OPTIONS = dict(batch_size=4, probe_batch_size=32, precision="fp32", progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "train")


@pytest.fixture(scope="module")
def one_process(folder: Path) -> tuple[rp.ReproduceResult, Lab]:
    lab = tiny_lab()
    scanned = rp.scan_dataset(folder, num_classes=NUM_CLASSES)
    return rp.run(lab, folder, scanned.samples, rp.ReproduceOptions(**OPTIONS)), lab


def assert_same(a: rp.ReproduceResult, b: rp.ReproduceResult) -> None:
    assert set(a.sums) == set(b.sums)
    for key, value in a.sums.items():
        if value.dtype.kind in "iu":
            np.testing.assert_array_equal(value, b.sums[key], err_msg=key)
        else:
            np.testing.assert_allclose(value, b.sums[key], rtol=1e-6, atol=1e-9, err_msg=key)


def test_numbers_match_a_per_image_computation(folder: Path, one_process: tuple[rp.ReproduceResult, Lab]) -> None:
    result, lab = one_process
    assert result.images == 9 and result.decode_errors == 1
    assert "zz_broken.jpg" in result.decode_error_examples[0]
    options = AnalysisOptions(precision="fp32", probe_batch_size=GROUPS)
    correct = dict.fromkeys(lab.models, 0)
    group_correct = {k: np.zeros(GROUPS, int) for k in lab.models}
    group_score = {k: np.zeros(GROUPS) for k in lab.models}
    gates, labels = [], []
    for path in sorted(folder.rglob("img*")):
        label = int(path.parent.name)
        image = prepare(decode_image(path))
        res = analyze(lab, image, options)
        for key, m in res.models.items():
            correct[key] += int(m.top5[0].index == label)
            assert m.probe is not None
            group_correct[key] += (m.probe.predictions.numpy() == label)
            group_score[key] += m.probe.scores.numpy()
        gates.append(res.models["sanet50"].sa_gates)
        labels.append(label)
    for key in lab.models:
        assert int(result.sums[f"{key}.correct"]) == correct[key]
        np.testing.assert_array_equal(result.sums[f"{key}.group_correct"], group_correct[key])
        np.testing.assert_allclose(result.sums[f"{key}.group_score"], group_score[key], rtol=1e-4, atol=1e-5)
    # The test is only worth something if the masked predictions vary.
    assert 0 < result.sums["sanet50.group_correct"].sum() < 9 * GROUPS
    reference = class_correlation(gates, labels)
    mine = result.class_correlation("sanet50")
    assert mine.depths == reference.depths == ["SA_2_1", "SA_3_1", "SA_4_1", "SA_5_1"]
    order = [reference.classes.index(c) for c in mine.classes]
    for depth in mine.depths:
        np.testing.assert_allclose(mine.mean_between[depth], reference.mean_between[depth], atol=1e-6)
        np.testing.assert_allclose(mine.matrices[depth], reference.matrices[depth][np.ix_(order, order)], atol=1e-6)
    classes, channel, _ = result.class_profiles("sanet50")
    first = [i for i, lab_ in enumerate(labels) if lab_ == classes[0]]
    np.testing.assert_allclose(channel[0, 0], np.mean([gates[i]["SA_2_1"]["channel"] for i in first], 0), atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_cpu_group(rank: int, world: int, port: int) -> tuple[int, int, str]:
    """In an ``mp.spawn`` worker: torchrun's variables, one thread, then ``init_distributed``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return rp.init_distributed("cpu")


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    got_rank, got_world, device = join_cpu_group(rank, world, port)
    assert (got_rank, got_world, device) == (rank, world, "cpu")
    try:
        samples = rp.scan_dataset(folder, num_classes=NUM_CLASSES).samples
        result = rp.run(tiny_lab(), folder, samples, rp.ReproduceOptions(**OPTIONS), state_dir=Path(out) / "state")
        np.savez(Path(out) / f"rank{rank}.npz", images_this_session=result.images_this_session,
                 world=result.world_size, **result.sums)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_give_the_same_numbers_as_one(folder: Path, one_process: tuple[rp.ReproduceResult, Lab],
                                                    tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, join=True)
    single, _ = one_process
    for rank in (0, 1):  # every rank holds the all-reduced sums
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            assert int(z["world"]) == 2 and int(z["images_this_session"]) == 10
            for key, value in single.sums.items():
                if value.dtype.kind in "iu":
                    np.testing.assert_array_equal(z[key], value, err_msg=key)
                else:
                    np.testing.assert_allclose(z[key], value, rtol=1e-6, atol=1e-9, err_msg=key)
    # Ten files over two ranks: five each, no padded repeats; each rank saved its own state.
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["rank0000-of-0002.pt", "rank0001-of-0002.pt"]
    assert [len(rp.ShardSampler(9, r, 2)) for r in (0, 1)] == [5, 4]


def test_an_interrupted_run_resumes_to_the_same_result(folder: Path, one_process: tuple[rp.ReproduceResult, Lab],
                                                       tmp_path: Path) -> None:
    samples = rp.scan_dataset(folder, num_classes=NUM_CLASSES).samples
    lab = tiny_lab()
    options = {**OPTIONS, "batch_size": 3, "checkpoint_every": 1}
    with pytest.raises(rp.ReproduceInterrupted):
        rp.run(lab, folder, samples, rp.ReproduceOptions(**options, stop_after_batches=2), state_dir=tmp_path)
    state = torch.load(tmp_path / "rank0000-of-0001.pt", weights_only=True)
    assert state["done"] == 6
    resumed = rp.run(lab, folder, samples, rp.ReproduceOptions(**options), state_dir=tmp_path)
    assert resumed.images_resumed == 6 and resumed.images_this_session == 4
    assert_same(resumed, one_process[0])
    # A finished state makes a rerun instant; another selection of images is refused, not mixed in.
    again = rp.run(lab, folder, samples, rp.ReproduceOptions(**options), state_dir=tmp_path)
    assert again.images_this_session == 0
    assert_same(again, one_process[0])
    with pytest.raises(rp.ReproduceStateError, match="another run"):
        rp.run(lab, folder, samples[:4], rp.ReproduceOptions(**options), state_dir=tmp_path)
    fresh = rp.run(lab, folder, samples[:4], rp.ReproduceOptions(**options, fresh=True), state_dir=tmp_path)
    assert fresh.images + fresh.decode_errors == 4


def test_outputs_profiles_and_nearest_classes(folder: Path, one_process: tuple[rp.ReproduceResult, Lab],
                                              tmp_path: Path) -> None:
    result, lab = one_process
    written = rp.write_outputs(result, tmp_path, data={"root": str(folder)})
    for name in ("summary.json", "accuracy.csv", "group_accuracy.csv", "per_class.csv", "correlation_vs_depth.csv",
                 "profiles.npz", "group_accuracy.png", "correlation_vs_depth.png", "correlation_matrices.png"):
        assert (tmp_path / name).is_file() and name in written, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == 9 and summary["decode_errors"] == 1 and summary["pretrained"] is False
    assert summary["warning"] and "UNTRAINED" in summary["warning"]
    for key in ("resnet50", "sanet50"):
        m = summary["models"][key]
        assert m["pretrained"] is False
        assert m["top1"] == pytest.approx(result.top1(key))
        assert len(m["group_probe"]["top1_per_group"]) == GROUPS
    assert list(summary["models"]["sanet50"]["mean_between_class_correlation"]) == result.models["sanet50"]["sa_depths"]
    assert "mean_between_class_correlation" not in summary["models"]["resnet50"]
    rows = (tmp_path / "group_accuracy.csv").read_text().splitlines()
    assert rows[0].startswith("group,resnet50_top1") and len(rows) == GROUPS + 2

    profiles = load_profiles(tmp_path / "profiles.npz")
    assert list(profiles.classes) == list(CLASSES) and list(profiles.counts) == [3, 3, 3]
    assert profiles.pretrained is False and profiles.channel.shape == (4, 3, 4)
    # A class's own mean profile is its nearest class at every depth.
    own = {d: {"channel": profiles.channel[i, 1], "spatial": profiles.spatial[i, 1]}
           for i, d in enumerate(profiles.depths)}
    nearest = nearest_classes_for(own, tmp_path / "profiles.npz", k=2)
    assert list(nearest) == profiles.depths
    for hits in nearest.values():
        assert hits[0].index == CLASSES[1] and hits[0].r == pytest.approx(1.0) and len(hits) == 2
    # The app's path: one uploaded image's gates from analyze.
    image = prepare(decode_image(next(folder.rglob("img0.jpg"))))
    gates = analyze(lab, image, AnalysisOptions(probe=False)).models["sanet50"].sa_gates
    hits = nearest_classes_for(gates, profiles)
    assert set(hits) == set(profiles.depths) and all(len(v) == 3 for v in hits.values())
    assert all(-1 <= h.r <= 1 and h.label for v in hits.values() for h in v)
    assert nearest_classes_for(None, profiles) == {}
    with pytest.raises(ValueError, match="groups"):
        nearest_classes_for({"SA_2_1": {"channel": np.zeros(64), "spatial": np.zeros(64)}}, profiles)


def test_folder_layouts_and_class_files(tmp_path: Path) -> None:
    wnid_root = make_folder(tmp_path / "wnid", WNIDS, broken=False)
    with pytest.raises(rp.DatasetError, match="--classes"):
        rp.scan_dataset(wnid_root)
    mapping = tmp_path / "classes.txt"
    mapping.write_text("".join(f"{w} {c}\n" for c, w in WNIDS.items()))
    scanned = rp.scan_dataset(wnid_root, classes_file=mapping)
    assert sorted({s.label for s in scanned.samples}) == list(CLASSES) and len(scanned.samples) == 9
    # LOC_synset_mapping.txt style: WordNet ids in index order, descriptions ignored.
    ordered = tmp_path / "LOC_synset_mapping.txt"
    ordered.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\nn01484850 great white shark\n"
                       "n01491361 tiger shark\n")
    assert {s.label for s in rp.scan_dataset(wnid_root, classes_file=ordered).samples} == {0, 2, 3}
    index_json = tmp_path / "imagenet_class_index.json"
    index_json.write_text(json.dumps({str(c): [w, "x"] for c, w in WNIDS.items()}))
    assert {s.label for s in rp.scan_dataset(wnid_root, classes_file=index_json).samples} == set(CLASSES)

    # The flat ImageNet val layout with 'FILENAME INDEX' lines; unlabelled files are counted, not used.
    flat = tmp_path / "val"
    flat.mkdir()
    for i in range(1, 5):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(flat / f"ILSVRC2012_val_{i:08d}.JPEG")
    labels = tmp_path / "val.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG 7\nILSVRC2012_val_00000002.JPEG 999\n"
                      "ILSVRC2012_val_00000003.JPEG n01484850\n")
    with pytest.raises(rp.DatasetError, match="--classes"):
        rp.scan_dataset(flat, labels_file=labels)
    scanned = rp.scan_dataset(flat, labels_file=labels, classes_file=mapping)
    assert [(s.path, s.label) for s in scanned.samples] == [
        ("ILSVRC2012_val_00000001.JPEG", 7), ("ILSVRC2012_val_00000002.JPEG", 999), ("ILSVRC2012_val_00000003.JPEG", 2)]
    assert scanned.unlabelled == 1 and scanned.layout == "flat"
    with pytest.raises(rp.DatasetError, match="--labels"):
        rp.scan_dataset(flat)

    # The devkit: ground truth holds ILSVRC2012_IDs, converted through meta.mat's sorted WordNet ids.
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    synsets = np.zeros((4, 1), dtype=[(f, "O") for f in fields])
    for row, values in enumerate([(1, "n02119789", "kit fox", "", 0), (2, "n01440764", "tench", "", 0),
                                  (3, "n00001740", "entity", "", 2), (4, "n01443537", "goldfish", "", 0)]):
        for f, v in zip(fields, values, strict=True):
            synsets[row, 0][f] = v
    devkit = tmp_path / "devkit" / "data"
    devkit.mkdir(parents=True)
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    truth = devkit / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("1\n2\n4\n1\n")
    scanned = rp.scan_dataset(flat, labels_file=truth)  # meta.mat found beside the ground truth
    assert [s.label for s in scanned.samples] == [2, 0, 1, 2]  # sorted: n01440764, n01443537, n02119789
    lone = tmp_path / "ground_truth.txt"
    lone.write_text(truth.read_text())
    with pytest.raises(rp.DatasetError, match="ILSVRC2012_IDs are not"):
        rp.scan_dataset(flat, labels_file=lone)
    assert [s.label for s in rp.scan_dataset(flat, labels_file=lone, classes_file=devkit / "meta.mat").samples] \
        == [2, 0, 1, 2]

    # --limit takes images round-robin over classes.
    samples = [rp.Sample(f"{c}/{i}", c) for c in (5, 1, 3) for i in range(3)]
    assert [s.label for s in rp.select_balanced(samples, 5)] == [1, 3, 5, 1, 3]


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_auto_precision_is_decided_per_model_on_the_first_decodable_image(folder: Path) -> None:
    lab = tiny_lab()
    samples = rp.scan_dataset(folder, num_classes=NUM_CLASSES).samples
    broken_first = [s for s in samples if "zz_broken" in s.path] + [s for s in samples if "zz_broken" not in s.path]
    chosen = rp.decide_precisions(lab, folder, broken_first, rp.ReproduceOptions(**{**OPTIONS, "precision": "auto"}))
    for key, lm in lab.models.items():
        assert lm.bf16_check is not None and lm.bf16_check.image == broken_first[1].path
        assert chosen[key] == lm.bf16_check.verdict
    # Explicit precisions are obeyed without a check; a failed check keeps auto at fp32.
    fresh = tiny_lab()
    assert rp.decide_precisions(fresh, folder, samples, rp.ReproduceOptions(**{**OPTIONS, "precision": "bf16"})) \
        == {"resnet50": "bf16", "sanet50": "bf16"}
    assert all(lm.bf16_check is None for lm in fresh.models.values())
    for lm in fresh.models.values():
        lm.bf16_check = PrecisionCheck("x", 0.3, 0.1)
    result = rp.run(fresh, folder, samples, rp.ReproduceOptions(**{**OPTIONS, "precision": "auto"}))
    assert result.precision == "fp32"
    assert result.models["sanet50"]["bf16_check"]["passed"] is False


@pytest.mark.slow
def test_cli_end_to_end_with_full_size_untrained_models(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", broken=False)
    out = tmp_path / "out"
    env = {**os.environ, "SANET_VIZ_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "sanet_viz", "reproduce", "--data", str(data), "--out", str(out), "--limit", "2",
           "--batch-size", "2", "--probe-batch-size", "32", "--workers", "0", "--precision", "auto",
           "--resnet50", "untrained", "--sanet50", "untrained", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stderr and "images/s" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2 and summary["classes"] == 2 and summary["pretrained"] is False
    assert summary["data"]["images_found"] == 9 and summary["device"]["device"] == "cpu"
    assert summary["throughput"]["images_per_s"] > 0
    for key in ("resnet50", "sanet50"):
        assert summary["models"][key]["pretrained"] is False
        probe = summary["models"][key]["group_probe"]
        assert probe["layer"] == "layer4.2" and probe["paper_name"] == "SA_5_3" and len(probe["top1_per_group"]) == 64
        check = summary["models"][key]["bf16_check"]  # --precision auto on a bf16 CPU checks first
        assert summary["models"][key]["probe_precision"] in {"fp32", "mixed", "bf16"}
        if bf16_supported(torch.device("cpu")):
            assert check["image"] and summary["models"][key]["probe_precision"] == check["verdict"]
            assert check["verdict"] != "bf16" or check["passed"]
    depths = summary["models"]["sanet50"]["sa_depths"]
    assert len(depths) == 16 and depths[0] == "SA_2_1" and depths[-1] == "SA_5_3"
    profiles = load_profiles(out / "profiles.npz")
    assert profiles.channel.shape == (16, 2, 64) and profiles.pretrained is False
    for name in ("group_accuracy.png", "correlation_vs_depth.png", "correlation_matrices.png"):
        assert (out / name).stat().st_size > 1000
