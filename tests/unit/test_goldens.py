"""Goldens: every case of tests/testdata/in/ gives exactly the files of tests/testdata/out/.

One case per feature (tests/testdata/README.md lists the conventions). After an intended
change, regenerate and review the diff like code:

    UPDATE_GOLDENS=1 make test PYTEST_ARGS=tests/unit/test_goldens.py

which rewrites every output and deletes the stale ones (an output type a case no longer
produces, the outputs of a case that is gone). Without the flag an unexpected, missing or
stale file fails. Every case's listeners and clusters also pass `envoy --mode validate`.
"""

from __future__ import annotations

import difflib
import os

import pytest

from tests.support import goldens
from tests.support.envoy import validate_static
from tests.support.static_secrets import with_static_secrets
from xds_server.bootstrap import SidecarSpec, sidecar_bootstrap

UPDATE = os.environ.get("UPDATE_GOLDENS") == "1"
CASES = goldens.cases()
ENVOY_CASES = [c for c in CASES if not c.startswith("proxyless-")]
# What a real sidecar runs with (the RE2 program size limits user regexes need).
SIDECAR_RUNTIME = {"layered_runtime": sidecar_bootstrap(SidecarSpec("ns", "sa", "pod", "127.0.0.1"))["layered_runtime"]}


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    assert goldens.CASE_NAME.match(case), f"{case}: case names are lower-case words and dashes"
    _, resources = goldens.translate_case(case)
    actual = goldens.render(case, resources)
    existing = {p.name: p for p in goldens.out_files(case)}
    if UPDATE:
        goldens.OUT_DIR.mkdir(parents=True, exist_ok=True)
        for name, text in actual.items():
            path = goldens.OUT_DIR / name
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
        for name in existing.keys() - actual.keys():
            existing[name].unlink()
        return
    stale, missing = sorted(existing.keys() - actual.keys()), sorted(actual.keys() - existing.keys())
    assert not stale and not missing, (
        f"{case}: stale outputs {stale}, missing outputs {missing}; UPDATE_GOLDENS=1 regenerates them")
    for name, text in actual.items():
        expected = existing[name].read_text()
        if expected != text:
            diff = difflib.unified_diff(expected.splitlines(), text.splitlines(), "golden", "actual", lineterm="")
            pytest.fail(f"{case}: {name} differs (UPDATE_GOLDENS=1 to accept):\n" + "\n".join(list(diff)[:80]))


def test_no_stale_outputs() -> None:
    """An output whose case is gone: deleted with the flag, a failure without it."""
    stale = [p for p in goldens.out_files() if goldens.case_of(p) not in CASES]
    if UPDATE:
        for path in stale:
            path.unlink()
        return
    assert not stale, f"outputs without an input case: {[p.name for p in stale]}; UPDATE_GOLDENS=1 deletes them"


def test_rendering_is_deterministic() -> None:
    """Two translations of one case (each with a fresh CA) render byte for byte the same."""
    for case in ("mtls-strict", "route-filters"):
        first = goldens.render(case, goldens.translate_case(case)[1])
        assert first == goldens.render(case, goldens.translate_case(case)[1])


@pytest.mark.envoy
@pytest.mark.parametrize("case", ENVOY_CASES)
def test_envoy_accepts_the_case(case: str) -> None:
    """What the case's proxy receives passes `envoy --mode validate` (EDS and RDS inlined;
    SDS references made static: Envoy 1.40's validate mode segfaults on SDS over ADS).
    Proxyless cases are not Envoy configs (a gRPC api_listener, gRPC certificate providers);
    the stock grpcio client tests accept those."""
    proxy, resources = goldens.translate_case(case)
    assert not proxy.proxyless
    by_type = {goldens.OUTPUT_TYPES[s][0]: list(ms) for s, ms in resources.items() if s != "secrets"}
    ok, output = validate_static(with_static_secrets(by_type), bootstrap_overrides=SIDECAR_RUNTIME)
    assert ok, f"{case}: envoy --mode validate failed:\n{output[-3000:]}"
