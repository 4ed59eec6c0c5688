"""`reproduce` over any registered models: each model's own preprocessing of the same crop, class
sums of every gated model's gates (SA per group, SE per channel), their class correlation, the
files per gated model, torchrun and resume with an SE model (tiny models, generated data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import randomize_sa
from test_attention_models import lively
from test_reproduce import (
    GROUPS,
    NUM_CLASSES,
    OPTIONS,
    PLANES,
    _free_port,
    assert_same,
    join_cpu_group,
    make_folder,
    tiny_lab,
)

from sanet_viz import models
from sanet_viz import reproduce as rp
from sanet_viz.analysis import AnalysisOptions, analyze
from sanet_viz.correlation import class_correlation
from sanet_viz.lab import Lab, LoadedModel
from sanet_viz.profiles import PROFILES_FORMAT, load_profiles, nearest_classes_for
from sanet_viz.reproduce import engine
from sanet_viz.weights import IMAGENET_EVAL, TIMM_BICUBIC_EVAL, EvalTransform, WeightsInfo

pytestmark = pytest.mark.usefixtures("one_thread")

SE_DEPTHS = ["SE_2_1", "SE_2_2", "SE_3_1", "SE_3_2", "SE_4_1", "SE_4_2", "SE_5_1", "SE_5_2"]
SE_WIDTHS = [64, 64, 128, 128, 256, 256, 512, 512]  # timm's seresnet18: one gate per channel


def se_model(transform: EvalTransform = TIMM_BICUBIC_EVAL) -> LoadedModel:
    """A small timm SE-ResNet in the seresnet50 slot, with timm's bicubic preprocessing."""
    import timm

    torch.manual_seed(0)
    se = lively(timm.create_model("seresnet18", pretrained=False, num_classes=NUM_CLASSES))
    info = WeightsInfo("tiny SE test model (random)", False, None, "test")
    return LoadedModel("seresnet50", "Tiny SE", se, info, probe_layer="layer4.1", probe_groups=GROUPS,
                       transform=transform)


def se_lab() -> Lab:
    """SE (bicubic, gates vary) beside an SA model with the paper's initialisation (every SA gate
    sigmoid(1): class profiles constant, correlation undefined) and the plain ResNet slot."""
    info = WeightsInfo("tiny test model (random)", False, None, "test")
    torch.manual_seed(0)
    flat_sa = randomize_sa(models.SAResNet([1, 1, 1, 1], num_classes=NUM_CLASSES, sa_groups=4, planes=PLANES), 2)
    with torch.no_grad():  # lively BatchNorm; SA gate weights back to 0 and biases to 1
        for m in flat_sa.modules():
            if isinstance(m, models.ShuffleAttention):
                m.cweight.zero_(), m.sweight.zero_(), m.cbias.fill_(1.0), m.sbias.fill_(1.0)
    return Lab({"resnet50": tiny_lab().models["resnet50"],
                "sanet50": LoadedModel("sanet50", "Flat SANet", flat_sa.eval(), info, probe_layer="layer4.0",
                                       probe_groups=GROUPS),
                "seresnet50": se_model()})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "train")


@pytest.fixture(scope="module")
def one_process(folder: Path) -> tuple[rp.ReproduceResult, Lab]:
    lab = se_lab()
    samples = rp.scan_dataset(folder, num_classes=NUM_CLASSES).samples
    return rp.run(lab, folder, samples, rp.ReproduceOptions(**OPTIONS)), lab


def test_each_model_gets_its_own_preprocessing_of_the_same_crop(folder: Path) -> None:
    samples = rp.scan_dataset(folder, num_classes=NUM_CLASSES).samples
    single = rp.ImageDataset(folder, samples, transform=[IMAGENET_EVAL])
    assert not single.stacked and single[0][0].shape == (3, 224, 224)
    both = rp.ImageDataset(folder, samples, transform=[IMAGENET_EVAL, TIMM_BICUBIC_EVAL, IMAGENET_EVAL])
    assert both.transforms == [IMAGENET_EVAL, TIMM_BICUBIC_EVAL]
    tensor, _, _, ok, _ = both[0]
    assert ok and tensor.shape == (2, 3, 224, 224)
    torch.testing.assert_close(tensor[0], single[0][0], rtol=0, atol=0)  # bilinear: exactly as one transform
    assert not torch.equal(tensor[1], tensor[0])  # bicubic: the same crop, resampled otherwise
    assert float((tensor[1] - tensor[0]).abs().mean()) < 0.2
    broken = next(s for s in samples if "zz_broken" in s.path)
    item = rp.ImageDataset(folder, [broken], transform=[IMAGENET_EVAL, TIMM_BICUBIC_EVAL])[0]
    assert not item[3] and item[0].shape == (2, 3, 224, 224)
    # The engine hands each model its own slice.
    lab = se_lab()
    x = torch.stack([torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)], 1)
    inputs = engine._model_inputs(lab, x)
    assert float(inputs["sanet50"].sum()) == 0 and float(inputs["seresnet50"].mean()) == 1
    assert inputs["resnet50"] is inputs["sanet50"]
    # Another crop cannot share the images: refused before anything runs.
    odd = se_model(EvalTransform(resize_size=288, crop_size=256, interpolation="bicubic"))
    with pytest.raises(ValueError, match="different crops"):
        rp.run(Lab({"sanet50": lab.models["sanet50"], "seresnet50": odd}), folder, samples,
               rp.ReproduceOptions(**OPTIONS))


def test_se_gates_summed_per_class_equal_a_per_image_loop(folder: Path,
                                                         one_process: tuple[rp.ReproduceResult, Lab]) -> None:
    result, lab = one_process
    assert result.images == 9 and result.decode_errors == 1
    assert result.gated() == ["sanet50", "seresnet50"]
    gates = result.models["seresnet50"]["gates"]
    assert gates["kind"] == "SE" and gates["unit"] == "channel" and gates["branches"] == ["channel"]
    assert gates["depths"] == SE_DEPTHS and gates["widths"] == SE_WIDTHS
    assert gates["modules"]["SE_5_2"] == "layer4.1.se.gate"
    assert result.models["seresnet50"]["preprocessing"]["interpolation"] == "bicubic"

    options = AnalysisOptions(precision="fp32", probe_batch_size=GROUPS, num_classes=NUM_CLASSES)
    per_image: dict[str, list[dict[str, dict[str, np.ndarray]]]] = {"sanet50": [], "seresnet50": []}
    labels, correct = [], dict.fromkeys(lab.models, 0)
    group_correct = {k: np.zeros(GROUPS, int) for k in lab.models}
    for path in sorted(folder.rglob("img*")):
        label = int(path.parent.name)
        image = lab.prepare(path)  # each model's preprocessing, as the app does it
        res = analyze(lab, image, options)
        for key, m in res.models.items():
            correct[key] += int(m.top5[0].index == label)
            assert m.probe is not None
            group_correct[key] += m.probe.predictions.numpy() == label
        for key in per_image:
            per_image[key].append(res.models[key].gates.values)  # type: ignore[union-attr]
        labels.append(label)
    for key in lab.models:
        assert int(result.sums[f"{key}.correct"]) == correct[key], key
        np.testing.assert_array_equal(result.sums[f"{key}.group_correct"], group_correct[key], err_msg=key)
    # SE: the per-class sums of every channel's gate at every depth.
    for depth, width in zip(SE_DEPTHS, SE_WIDTHS, strict=True):
        summed = result.sums[f"seresnet50.gates.{depth}.channel"]
        assert summed.shape == (NUM_CLASSES, width) and summed.dtype == np.float64
        for c in range(NUM_CLASSES):
            mine = [g[depth]["channel"] for g, y in zip(per_image["seresnet50"], labels, strict=True) if y == c]
            np.testing.assert_allclose(summed[c], np.sum(mine, 0) if mine else 0.0, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{depth} class {c}")
    # The class correlation is defined for SE and the same as from the per-image gates.
    reference = class_correlation(per_image["seresnet50"], labels)
    corr = result.class_correlation("seresnet50")
    assert corr.depths == reference.depths == SE_DEPTHS
    order = [reference.classes.index(c) for c in corr.classes]
    for depth in SE_DEPTHS:
        assert corr.defined(depth)
        np.testing.assert_allclose(corr.mean_between[depth], reference.mean_between[depth], atol=1e-6)
        np.testing.assert_allclose(corr.matrices[depth], reference.matrices[depth][np.ix_(order, order)], atol=1e-6)
    # Constant SA gates (the paper's initialisation): undefined at every depth, and said why.
    flat = result.class_correlation("sanet50")
    assert all(np.isnan(v) for v in flat.mean_between.values())
    assert all("constant" in flat.notes[d] for d in flat.depths)
    classes, channel, spatial = result.class_profiles("seresnet50")
    assert spatial is None and channel.shape == (8, 3, 512)
    assert np.isnan(channel[0, :, 64:]).all() and np.isfinite(channel[-1]).all()


def test_outputs_for_every_gated_model(folder: Path, one_process: tuple[rp.ReproduceResult, Lab],
                                       tmp_path: Path) -> None:
    result, lab = one_process
    written = rp.write_outputs(result, tmp_path)
    expected = {"summary.json", "accuracy.csv", "group_accuracy.csv", "per_class.csv", "group_accuracy.png",
                "profiles.npz", "correlation_vs_depth.csv", "correlation_vs_depth.png", "correlation_matrices.png",
                "profiles_seresnet50.npz", "correlation_vs_depth_seresnet50.csv",
                "correlation_vs_depth_seresnet50.png", "correlation_matrices_seresnet50.png",
                "correlation_vs_depth_all.csv", "correlation_vs_depth_all.png"}
    assert set(written) == expected and {p.name for p in tmp_path.iterdir()} == expected
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["files"] == sorted(expected)
    assert "UNTRAINED" in summary["warning"] and "Tiny SE" in summary["warning"]
    se, sa = summary["models"]["seresnet50"], summary["models"]["sanet50"]
    assert se["pretrained"] is False and se["gates"]["kind"] == "SE" and se["gates"]["widths"] == SE_WIDTHS
    assert list(se["mean_between_class_correlation"]) == SE_DEPTHS
    assert all(v is not None for v in se["mean_between_class_correlation"].values())
    assert "note" not in se and "sa_depths" not in se
    # SANet50's entry keeps exactly its keys (no "gates"); its constant gates are undefined, said so.
    assert "gates" not in sa and sa["sa_depths"] == ["SA_2_1", "SA_3_1", "SA_4_1", "SA_5_1"]
    assert all(v is None for v in sa["mean_between_class_correlation"].values())
    assert "constant" in sa["note"] and set(sa["correlation_undefined"]) == set(sa["sa_depths"])
    across = summary["correlation_across_models"]
    assert across["positions"] == [d.removeprefix("SE_") for d in SE_DEPTHS]
    assert across["models"]["sanet50"]["mean_between_class_correlation"] == [None] * 8
    assert across["models"]["seresnet50"]["pretrained"] is False
    assert across["models"]["seresnet50"]["mean_between_class_correlation"] == pytest.approx(
        list(se["mean_between_class_correlation"].values()))
    rows = (tmp_path / "correlation_vs_depth_all.csv").read_text().splitlines()
    assert rows[0] == "position,sanet50_mean_between_class_correlation,seresnet50_mean_between_class_correlation"
    assert rows[1].startswith("2_1,nan,0.") and rows[2].startswith("2_2,,0.")  # nan: undefined; empty: no module
    se_rows = (tmp_path / "correlation_vs_depth_seresnet50.csv").read_text().splitlines()
    assert len(se_rows) == 9 and se_rows[1].startswith("seresnet50,SE_2_1,layer1.0.se.gate,0.")
    sa_rows = (tmp_path / "correlation_vs_depth.csv").read_text().splitlines()
    assert sa_rows[1] == "sanet50,SA_2_1,layer1.0.sa,nan,3"

    # The SA file keeps its layout; the SE file records its kind and widths.
    with np.load(tmp_path / "profiles.npz") as z:
        assert set(z.files) == {"classes", "labels", "counts", "depths", "channel", "spatial", "model", "pretrained",
                                "weights_source", "images", "format"} and str(z["format"]) == PROFILES_FORMAT
    profiles = load_profiles(tmp_path / "profiles_seresnet50.npz")
    assert profiles.kind == "SE" and profiles.model == "seresnet50" and profiles.pretrained is False
    assert profiles.depths == SE_DEPTHS and list(profiles.widths) == SE_WIDTHS and profiles.spatial is None
    assert profiles.channel.shape == (8, 3, 512) and list(profiles.counts) == [3, 3, 3]
    # A class's own mean profile is its nearest class at every depth.
    own = {d: {"channel": profiles.channel[i, 2, : SE_WIDTHS[i]]} for i, d in enumerate(SE_DEPTHS)}
    nearest = nearest_classes_for(own, profiles, k=2)
    assert list(nearest) == SE_DEPTHS
    assert all(hits[0].index == 3 and hits[0].r == pytest.approx(1.0) for hits in nearest.values())
    # The app's path: an image's SE gates from analyze, as a GateProfile or its values.
    image = lab.prepare(next(folder.rglob("img0.jpg")))
    profile = analyze(lab, image, AnalysisOptions(probe=False, num_classes=NUM_CLASSES)).models["seresnet50"].gates
    hits = nearest_classes_for(profile, tmp_path / "profiles_seresnet50.npz")
    assert set(hits) == set(SE_DEPTHS) and all(len(v) == 3 and -1 <= v[0].r <= 1 for v in hits.values())
    assert nearest_classes_for(profile.values, profiles) == hits  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="64 gates"):
        nearest_classes_for({"SE_3_1": {"channel": np.zeros(64)}}, profiles)
    # SA gates against SE profiles: no depth in common.
    assert nearest_classes_for({"SA_2_1": {"channel": np.zeros(4), "spatial": np.ones(4)}}, profiles) == {}
    flat = load_profiles(tmp_path / "profiles.npz")
    assert flat.kind == "SA" and flat.widths is None and flat.channel.shape == (4, 3, 4)
    sa_gates = analyze(lab, image, AnalysisOptions(probe=False, num_classes=NUM_CLASSES)).models["sanet50"].sa_gates
    assert all(v == [] for v in nearest_classes_for(sa_gates, flat).values())  # constant: undefined, none near


def test_a_lone_gated_model_writes_unsuffixed_files(folder: Path, tmp_path: Path) -> None:
    lab = Lab({"seresnet50": se_model()})  # one bicubic transform: no stacking
    samples = rp.scan_dataset(folder, num_classes=NUM_CLASSES).samples
    result = rp.run(lab, folder, samples, rp.ReproduceOptions(**{**OPTIONS, "probe": False}))
    written = rp.write_outputs(result, tmp_path)
    assert {"profiles.npz", "correlation_vs_depth.csv", "correlation_vs_depth.png",
            "correlation_matrices.png"} <= set(written)
    assert not any("seresnet50" in name or "_all" in name for name in written)
    assert load_profiles(tmp_path / "profiles.npz").kind == "SE"
    assert "correlation_across_models" not in json.loads((tmp_path / "summary.json").read_text())


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    join_cpu_group(rank, world, port)
    try:
        samples = rp.scan_dataset(folder, num_classes=NUM_CLASSES).samples
        result = rp.run(se_lab(), folder, samples, rp.ReproduceOptions(**OPTIONS), state_dir=Path(out) / "state")
        np.savez(Path(out) / f"rank{rank}.npz", images_this_session=result.images_this_session, **result.sums)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_with_an_se_model_give_the_same_numbers_as_one(
        folder: Path, one_process: tuple[rp.ReproduceResult, Lab], tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, join=True)
    single, _ = one_process
    assert any(k.startswith("seresnet50.gates.") for k in single.sums)
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            assert int(z["images_this_session"]) == 10
            assert set(z.files) - {"images_this_session"} == set(single.sums)
            for key, value in single.sums.items():
                if value.dtype.kind in "iu":
                    np.testing.assert_array_equal(z[key], value, err_msg=key)
                else:
                    np.testing.assert_allclose(z[key], value, rtol=1e-6, atol=1e-9, err_msg=key)


def test_a_run_with_an_se_model_resumes_and_old_states_are_refused(
        folder: Path, one_process: tuple[rp.ReproduceResult, Lab], tmp_path: Path) -> None:
    samples = rp.scan_dataset(folder, num_classes=NUM_CLASSES).samples
    lab = se_lab()
    options = {**OPTIONS, "batch_size": 3, "checkpoint_every": 1}
    with pytest.raises(rp.ReproduceInterrupted):
        rp.run(lab, folder, samples, rp.ReproduceOptions(**options, stop_after_batches=2), state_dir=tmp_path)
    resumed = rp.run(lab, folder, samples, rp.ReproduceOptions(**options), state_dir=tmp_path)
    assert resumed.images_resumed == 6 and resumed.images_this_session == 4
    assert_same(resumed, one_process[0])
    # Other preprocessing of the SE model is another run.
    other = Lab({**lab.models, "seresnet50": se_model(IMAGENET_EVAL)})
    with pytest.raises(rp.ReproduceStateError, match="another run"):
        rp.run(other, folder, samples, rp.ReproduceOptions(**options), state_dir=tmp_path)
    # A state written before gate sums per depth (format 1) is refused with the reason, not loaded.
    path = tmp_path / "rank0000-of-0001.pt"
    state = torch.load(path, weights_only=True)
    state["version"] = 1
    state["sums"] = {k: v for k, v in state["sums"].items() if ".gates." not in k}
    torch.save(state, path)
    with pytest.raises(rp.ReproduceStateError, match="another version of sanet-viz"):
        rp.run(lab, folder, samples, rp.ReproduceOptions(**options), state_dir=tmp_path)


@pytest.mark.slow
def test_cli_with_full_size_untrained_sa_se_and_eca(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from conftest import ROOT

    data = make_folder(tmp_path / "data", broken=False)
    out = tmp_path / "out"
    env = {**os.environ, "SANET_VIZ_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "sanet_viz", "reproduce", "--data", str(data), "--out", str(out), "--limit", "3",
           "--batch-size", "3", "--workers", "0", "--no-probe", "--no-progress", "--device", "cpu",
           "--models", "sanet50,seresnet50,ecaresnet50d", "--sanet50", "untrained", "--seresnet50", "untrained",
           "--ecaresnet50d", "untrained"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED ECA-ResNet50d" in proc.stderr and "between-class correlation of SE profiles" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and summary["pretrained"] is False and "SE-ResNet50" in summary["warning"]
    for name in ("profiles.npz", "profiles_seresnet50.npz", "profiles_ecaresnet50d.npz", "correlation_vs_depth_all.png",
                 "correlation_vs_depth_all.csv", "correlation_vs_depth_ecaresnet50d.png"):
        assert name in summary["files"] and (out / name).stat().st_size > 200, name
    sa, se, eca = (summary["models"][k] for k in ("sanet50", "seresnet50", "ecaresnet50d"))
    assert len(sa["sa_depths"]) == 16 and all(v is None for v in sa["mean_between_class_correlation"].values())
    # Untrained timm models: BatchNorm zero-initialised at each block's end, so ECA's gates are all
    # sigmoid(0) (undefined) and SE's the same for every image (r = 1, flagged as no finding).
    assert all(v is None for v in eca["mean_between_class_correlation"].values()) and "constant" in eca["note"]
    assert "0.5" in eca["correlation_undefined"]["ECA_5_3"]
    assert "same SE profile" in se["note"] and se["gates"]["widths"][0] == 256 and se["gates"]["widths"][-1] == 2048
    eca_profiles = load_profiles(out / "profiles_ecaresnet50d.npz")
    assert eca_profiles.kind == "ECA" and eca_profiles.channel.shape == (16, 3, 2048)
    assert list(eca_profiles.widths) == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert summary["correlation_across_models"]["positions"][0] == "2_1"
