"""examples/diagnose_matching.py: the matching diagnostics behind the README's analysis."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from midms_plugins.synthfaces.generator import make_pair

from midms_cli.models.midm import MIDM
from midms_cli.presets import preset

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "diagnose_matching.py"


@pytest.fixture(scope="module")
def diagnose():
    spec = importlib.util.spec_from_file_location("diagnose_matching", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.diagnose


def _model() -> MIDM:
    config = preset("tiny")
    config.correspondence.cond_channels = 1
    torch.manual_seed(0)
    return MIDM(config).eval()


def test_a_self_pair_reaches_the_ceiling_with_the_nearest_latent_bound(diagnose):
    """Exemplar = oracle: every oracle latent is found in the exemplar, so the bound decodes the
    oracle's own latent (the ceiling) and the copy is exact."""
    samples = [make_pair(i, 3, 64, variant="canny", pairing="self") for i in range(2)]
    report = diagnose(_model(), samples, tau=0.02)
    bound = report["PSNR bound: nearest exemplar latent to the oracle's"]
    assert bound == pytest.approx(report["PSNR ceiling (oracle through the first stage)"], abs=1e-9)
    assert report["PSNR exemplar copied"] == pytest.approx(100.0)
    assert 0.0 <= report["share of best matches that are the identity"] <= 1.0


def test_cross_pairs_report_every_row(diagnose):
    samples = [make_pair(i, 3, 64, variant="canny", pairing="hard") for i in range(3)]
    report = diagnose(_model(), samples, tau=0.02, batch_size=2)
    assert report["PSNR exemplar copied"] < 40
    assert sum("background" in name for name in report) == 2
    assert all(torch.isfinite(torch.tensor(value)) for value in report.values())
