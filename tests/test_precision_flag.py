"""The probe precision an operator fixes (--precision / $SANET_VIZ_PRECISION): read by the app's
flags, the CLI's, and the handlers' analysis options; the warm-up says which precision runs."""

from __future__ import annotations

import argparse
import logging

import pytest
from test_ui_handlers import tiny_lab

from sanet_viz.cli.analyze import add_parser as add_analyze_parser
from sanet_viz.server import startup
from sanet_viz.server.config import parse_args
from sanet_viz.ui import AppSettings, build_demo


def test_app_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANET_VIZ_PRECISION", raising=False)
    assert parse_args([]).precision == "auto"
    assert parse_args(["--precision", "fp32"]).precision == "fp32"
    monkeypatch.setenv("SANET_VIZ_PRECISION", "mixed")
    assert parse_args([]).precision == "mixed"
    assert parse_args(["--precision", "bf16"]).precision == "bf16"  # the flag wins over the variable
    with pytest.raises(SystemExit):
        parse_args(["--precision", "fp16"])
    monkeypatch.setenv("SANET_VIZ_PRECISION", "half")
    with pytest.raises(SystemExit, match=r"SANET_VIZ_PRECISION must be one of auto, fp32, mixed, bf16, got 'half'"):
        parse_args([])


def test_cli_reads_the_same_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANET_VIZ_PRECISION", "fp32")
    parser = argparse.ArgumentParser()
    add_analyze_parser(parser.add_subparsers())
    assert parser.parse_args(["analyze", "x.jpg", "--out", "o"]).precision == "fp32"


def test_handlers_and_warm_up_use_the_fixed_precision(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    lab = tiny_lab()
    handlers = build_demo(lab, AppSettings(precision="fp32")).handlers
    assert handlers.options("gradcam", None, None).precision == "fp32"
    with caplog.at_level(logging.INFO, logger="sanet-viz"):
        startup.warm_up(lab, precision="fp32")
    assert all(lm.bf16_check is None for lm in lab.models.values())  # no check ran
    assert "Tiny SANet: probes run in fp32 (--precision)" in caplog.text
