"""A throwaway OpenSSH server set-up for tests: host and client keys, config, run dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/ssh_host_ed25519_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""


def make_sshd_dir(sshdir: Path, port: int) -> Path:
    """Create ``sshdir`` with a host key, a client key (``client_key``, mode 600) that
    ``authorized_keys`` admits, and an ``sshd_config`` for 127.0.0.1:``port``; make the
    privilege-separation directory sshd insists on. Returns the config's path."""
    sshdir.mkdir()
    for key in ("ssh_host_ed25519_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshdir / key)],
                       check=True)
    (sshdir / "authorized_keys").write_text((sshdir / "client_key.pub").read_text())
    (sshdir / "client_key").chmod(0o600)
    cfg = sshdir / "sshd_config"
    cfg.write_text(SSHD_CONFIG.format(port=port, dir=sshdir))
    Path("/run/sshd").mkdir(exist_ok=True)
    return cfg
