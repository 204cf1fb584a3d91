"""DeepSpeed's private ZeRO attributes are read in one module, with a tested version range and a clear start-up error on
a layout it does not know; the methods know nothing of DeepSpeed."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import pytest

from uegr_dist import deepspeed_internals
from uegr_dist.deepspeed_internals import TESTED_VERSIONS, ZERO_OPTIMIZERS, UnsupportedDeepSpeedError, check_zero_layout

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "uegr_dist"


def test_private_zero_attributes_are_read_only_in_deepspeed_internals():
    private = sorted({name for names in ZERO_OPTIMIZERS.values() for name in names} - {"optimizer"})
    pattern = re.compile(r"\.(" + "|".join(map(re.escape, private)) + r")\b")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "deepspeed_internals.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert pattern.search("zopt.averaged_gradients[i]")  # the scan would see an access


def test_no_method_tests_for_deepspeed():
    """`grep -rn "deepspeed\\|is_deepspeed_engine" uegr_dist/methods` finds nothing: the backend is chosen outside."""
    found = subprocess.run(
        ["grep", "-rn", r"deepspeed\|is_deepspeed_engine", str(PACKAGE / "methods")], capture_output=True, text=True
    )
    assert found.returncode == 1 and not found.stdout, found.stdout


def _fake_engine(kind: str, attributes: tuple[str, ...]):
    zopt = type(kind, (), {})()
    for name in attributes:
        setattr(zopt, name, None)
    return type("Engine", (), {"optimizer": zopt})()


@pytest.mark.parametrize("kind", sorted(ZERO_OPTIMIZERS))
def test_a_known_layout_passes_and_a_missing_attribute_is_named(kind):
    pytest.importorskip("deepspeed")
    assert check_zero_layout(_fake_engine(kind, ZERO_OPTIMIZERS[kind])) is True
    missing = ZERO_OPTIMIZERS[kind][0]
    with pytest.raises(
        UnsupportedDeepSpeedError, match=rf"{kind} has no {missing}, .*pip install 'deepspeed>=0.16,<0.20'"
    ):
        check_zero_layout(_fake_engine(kind, ZERO_OPTIMIZERS[kind][1:]))


def test_other_deepspeed_optimizers_are_not_zero_layouts():
    pytest.importorskip("deepspeed")
    assert check_zero_layout(_fake_engine("BF16_Optimizer", ())) is False


def test_an_untested_release_with_a_known_layout_warns(monkeypatch, caplog):
    pytest.importorskip("deepspeed")
    monkeypatch.setattr(deepspeed_internals, "deepspeed_version", lambda: (0, 99))
    kind = "DeepSpeedZeroOptimizer"
    with caplog.at_level(logging.WARNING, logger="uegr_dist.deepspeed_internals"):
        assert check_zero_layout(_fake_engine(kind, ZERO_OPTIMIZERS[kind]))
    assert "outside the tested range >=0.16,<0.20" in caplog.text


def test_tested_range_is_setup_cfgs_bound_and_contains_the_installed_release():
    deepspeed = pytest.importorskip("deepspeed")
    low, high = (".".join(map(str, v)) for v in TESTED_VERSIONS)
    assert f"deepspeed>={low},<{high}" in (REPO / "setup.cfg").read_text(encoding="utf-8")
    major, minor = (int(x) for x in deepspeed.__version__.split(".")[:2])
    assert TESTED_VERSIONS[0] <= (major, minor) < TESTED_VERSIONS[1]
