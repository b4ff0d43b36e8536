"""Device selection and the mixed-precision dtype per device."""

import pytest
import torch

from midms_cli import devices
from midms_cli.errors import MidmsError


def test_cpu_autocasts_to_bfloat16_only_when_the_hardware_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: True)
    assert devices.autocast_dtype(cpu) is torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: False)
    assert devices.autocast_dtype(cpu) is None  # emulated bfloat16 is slower than float32


def test_native_bfloat16_probe_answers_without_raising():
    assert devices.cpu_has_native_bfloat16() in (True, False)


def test_unknown_device_names_are_one_clear_error():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MidmsError, match="unknown device 'tpu'"):
        devices.resolve_device("tpu")
