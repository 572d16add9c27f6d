"""holesail beside quictun in the lab: install it, run a local HyperDHT, start its ends.

holesail (an npm package: a TCP proxy over HyperDHT, holepunching between two peers) is
what many users pick instead of quictun. To run it in the network lab without touching
the internet (docs/benchmark.md, "Side by side"; shared NOTES section 7):

* :func:`ensure_installed` runs ``npm install --prefix DIR holesail@VERSION`` once (DIR
  defaults to ``~/.cache/quictun-bench/holesail-VERSION``); it returns ``(dir, None)`` or
  ``(None, reason)`` when node/npm are missing or the install fails.
* :data:`DHT_CODE` (node, in the lab's wan namespace): one ``bootstrapper`` plus
  ``N`` ordinary persistent nodes on the same address (hyperdht wants several distinct
  nodes to classify a peer's firewall; with one, every connection ended in
  ``HOLEPUNCH_ABORTED``).
* :data:`PRELOAD_CODE` (``node --require``, in front of holesail's own CLI): replaces the
  contents of every loaded ``hyperdht``'s ``BOOTSTRAP`` array in place with the lab's nodes
  (holesail only calls ``new HyperDHT()``, which reads that array), and substitutes Node's
  ``dgram`` for the Bare-only ``bare-dgram`` that holesail 2.4.1's net helper requires
  (only its UDP mode uses it). It refuses to start without a bootstrap list, so holesail
  can never fall back to the public nodes.

Nothing here imports the lab: :mod:`quictun.bench.labrig` spawns these in namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

VERSION = "2.4.1"
BOOTSTRAP_ENV = "QTBENCH_HYPERDHT_BOOTSTRAP"

# Loaded with `node --require` before holesail's CLI. CommonJS: holesail's libraries are
# CommonJS, so their require() calls go through Module._load, where the two fixes apply.
PRELOAD_CODE = r"""
'use strict'
const Module = require('module')
const boot = (process.env.QTBENCH_HYPERDHT_BOOTSTRAP || '').split(',').filter(Boolean)
if (boot.length === 0) {
  console.error('qtbench preload: QTBENCH_HYPERDHT_BOOTSTRAP is empty; refusing to start')
  process.exit(2)
}
const load = Module._load
const patched = new Set()
Module._load = function (request, parent, isMain) {
  if (request === 'bare-dgram') return require('dgram')
  const mod = load.apply(this, arguments)
  if (request === 'hyperdht' && Array.isArray(mod.BOOTSTRAP) && !patched.has(mod)) {
    mod.BOOTSTRAP.splice(0, mod.BOOTSTRAP.length, ...boot)
    patched.add(mod)
    console.error('qtbench preload: hyperdht bootstrap = ' + mod.BOOTSTRAP.join(','))
  }
  return mod
}
"""

# argv: <hyperdht dir> <host> <bootstrap port> <ordinary nodes>. Prints one line
# "dht ready <host>:<port>,..." when every node is fully bootstrapped, then serves until
# killed.
DHT_CODE = r"""
'use strict'
const DHT = require(process.argv[2])
const host = process.argv[3]
const port = Number(process.argv[4])
const count = Number(process.argv[5])
async function main () {
  const nodes = [DHT.bootstrapper(port, host, { host })]
  await nodes[0].fullyBootstrapped()
  const bootstrap = [`${host}:${port}`]
  for (let i = 0; i < count; i++) {
    const node = new DHT({ bootstrap, host, port: port + 1 + i, anyPort: false,
                           ephemeral: false, firewalled: false })
    await node.fullyBootstrapped()
    nodes.push(node)
  }
  const addrs = nodes.map((n) => `${n.address().host}:${n.address().port}`)
  console.log('dht ready ' + addrs.join(','))
  const stop = async () => { for (const n of nodes) await n.destroy(); process.exit(0) }
  process.once('SIGTERM', stop)
  process.once('SIGINT', stop)
}
main().catch((err) => { console.error(err); process.exit(1) })
"""


def default_dir() -> Path:
    """Where :func:`ensure_installed` puts holesail unless told otherwise."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "quictun-bench" / f"holesail-{VERSION}"


def node_missing() -> str | None:
    """Why holesail cannot run here (node or npm not on PATH), or None."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install nodejs npm)"
    return None


def installed_version(prefix: Path) -> str | None:
    """holesail's version under ``prefix`` (an ``npm --prefix`` directory), or None."""
    try:
        pkg = json.loads((prefix / "node_modules" / "holesail" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = pkg.get("version")
    return version if isinstance(version, str) else None


def ensure_installed(prefix: Path | None = None,
                     timeout: float = 300.0) -> tuple[Path | None, str | None]:
    """``(prefix, None)`` with holesail :data:`VERSION` installed there, or ``(None, why)``.

    Installs with ``npm install --prefix`` (the npm registry) only when that version is not
    there yet; never raises for a missing tool or a failed install.
    """
    reason = node_missing()
    if reason:
        return None, reason
    prefix = (prefix or default_dir()).resolve()
    if installed_version(prefix) == VERSION:
        return prefix, None
    prefix.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit",
                            "--no-fund", f"holesail@{VERSION}"],
                           capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"npm install holesail@{VERSION} failed: {exc}"
    if r.returncode != 0 or installed_version(prefix) != VERSION:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"npm install holesail@{VERSION} failed: {last[0]}"
    return prefix, None


class Scripts:
    """The JS files under ``work`` and the argv of each holesail process."""

    def __init__(self, prefix: Path, work: Path) -> None:
        self.prefix = prefix
        self.modules = prefix / "node_modules"
        self.preload = work / "qtbench-preload.cjs"
        self.dht = work / "qtbench-dht.cjs"
        self.preload.write_text(PRELOAD_CODE)
        self.dht.write_text(DHT_CODE)
        self.cli = self.modules / "holesail" / "src" / "bin" / "holesail.mjs"

    def dht_argv(self, host: str, port: int, nodes: int) -> list[str]:
        """The local HyperDHT: a bootstrapper on ``host:port`` plus ``nodes`` more."""
        return ["node", str(self.dht), str(self.modules / "hyperdht"), host, str(port),
                str(nodes)]

    def server_argv(self, port: int, key: str) -> list[str]:
        """holesail exposing 127.0.0.1:``port`` under the (private) ``key``."""
        return ["node", "--require", str(self.preload), str(self.cli), "--live", str(port),
                "--host", "127.0.0.1", "--key", key]

    def client_argv(self, key: str, port: int) -> list[str]:
        """holesail's client: a local listener on 127.0.0.1:``port`` to the server that
        :meth:`server_argv` started with the same private ``key``."""
        return ["node", "--require", str(self.preload), str(self.cli), f"hs://s000{key}",
                "--port", str(port), "--host", "127.0.0.1"]

    @staticmethod
    def env(bootstrap: list[str]) -> dict[str, str]:
        return {BOOTSTRAP_ENV: ",".join(bootstrap), "NO_COLOR": "1"}
