"""Fixtures for the network lab: ``lab_factory`` builds Labs and always tears them down;
``lab_engine`` runs a tunnel cell once per QUIC engine."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .netlab import Lab, SiteSpec, lab_available, list_namespaces, sweep_stale_namespaces

_PREFIX = "qtl"
_probe_result: list[str | None] = []


def _engine_params() -> list[Any]:
    """One param per QUIC engine; qh3 skips, with the reason, where it is not installed
    (the ``test`` extra installs it, so CI runs both)."""
    from quictun.quic import engines

    have = set(engines.available())
    return [pytest.param(name, id=name, marks=[] if name in have else [pytest.mark.skip(
        reason="qh3 2.1 is not installed (pip install -e '.[test]' or '.[fast]')")])
        for name in engines.NAMES]


def engine_pair_params() -> list[Any]:
    """(serve engine, connect engine) for every pair, the mixed ones too."""
    from quictun.quic import engines

    have = set(engines.available())
    return [pytest.param((s, c), id=f"serve-{s}-connect-{c}", marks=[] if {s, c} <= have
                         else [pytest.mark.skip(reason="qh3 2.1 is not installed")])
            for s in engines.NAMES for c in engines.NAMES]


@pytest.fixture(params=_engine_params())
def lab_engine(request: pytest.FixtureRequest) -> str:
    """The QUIC engine (QUICTUN_ENGINE) of both ends of a lab tunnel: every tunnel cell
    runs once on aioquic and once on qh3."""
    return request.param  # type: ignore[no-any-return]


def lab_skip_reason() -> str | None:
    """Why lab tests must be skipped here (cached), or None."""
    if not _probe_result:
        reason = lab_available()
        if reason is None:
            # root may still lack CAP_SYS_ADMIN (unprivileged container): try one namespace
            probe = f"{_PREFIX}-probe-{id(_probe_result):x}"
            proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
            if proc.returncode != 0:
                reason = f"cannot create a network namespace: {proc.stderr.strip()}"
            else:
                subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        _probe_result.append(reason)
    return _probe_result[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session", autouse=True)
def _sweep_lab_leftovers() -> Iterator[None]:
    """Delete namespaces left behind by earlier (dead) test sessions, before and after."""
    if lab_skip_reason() is None:
        sweep_stale_namespaces(_PREFIX)
    yield
    if lab_skip_reason() is None:
        sweep_stale_namespaces(_PREFIX)


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """``lab_factory(a, b=None, *, same_lan=False, **kw) -> Lab`` (already started).

    Every lab made is closed at teardown, pass or fail; on failure its ``describe()`` dump
    (counters, conntrack, process logs) is printed into the report and its logs are kept.
    """
    reason = lab_skip_reason()
    if reason:
        pytest.skip(f"network lab needs root and nft: {reason}")
    labs: list[Lab] = []

    def make(a: SiteSpec | str = "cone", b: SiteSpec | str | None = None, **kw: Any) -> Lab:
        lab = Lab(a, b, prefix=_PREFIX, **kw)
        labs.append(lab)
        lab.start()
        return lab

    try:
        yield make
    finally:
        rep = getattr(request.node, "rep_call", None)
        failed = rep is not None and rep.failed
        for lab in labs:
            if failed:
                print(f"\n===== lab dump ({request.node.nodeid}) =====")
                print(lab.describe())
            lab.close()
            if not failed:
                lab.cleanup_logs()
        leftovers = [ns for lab in labs for ns in lab.namespaces if ns in list_namespaces()]
        assert not leftovers, f"lab namespaces not deleted: {leftovers}"
