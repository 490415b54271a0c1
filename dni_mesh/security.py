"""CURVE keys of a mesh: the key folder, and the settings one process loads from it.

A mesh's keys live in one folder: `NAME.key` (the public key) and `NAME.key_secret` (the key
pair, mode 0600) per node, and one pair for the launcher, as pyzmq's `zmq.auth` writes them.
Every host gets every public key; each secret key goes only to the host that runs its process.
`create_keys` writes the folder (`dni-mesh keys`); `curve_for` loads what one process needs into a
`Curve`, which `TransportConfig.curve` hands to the sockets (`dni_mesh.transport`: every inbox a
CURVE server whose ZAP handler admits the `clients`' keys, every peer a CURVE client).

A secret key is read from its file into `Curve.secret_key` and handed to libzmq: it is never
printed, logged, sent, or shown by repr.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from dni_mesh.topology import LAUNCHER

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")


class SecurityError(RuntimeError):
    """A key file is missing, malformed, readable by others, or would be overwritten."""


@dataclass(frozen=True)
class Curve:
    """One process's CURVE settings: its key pair, the mesh's public keys, and whom its inbox admits."""

    name: str
    public_key: bytes  # Z85, 40 bytes, as libzmq takes it
    secret_key: bytes = field(repr=False)
    public_keys: Mapping[str, bytes] = field(repr=False)
    """Every public key of the mesh by name: the inboxes this process may dial."""
    clients: frozenset[str] = frozenset()
    """Names whose keys this process's inbox admits (a node: its neighbours; the launcher: every node)."""

    def server_key(self, server: str) -> bytes:
        """The public key a peer expects from `server`'s inbox."""
        try:
            return self.public_keys[server]
        except KeyError:
            raise SecurityError(f"no public key for {server!r} ({server}{PUBLIC_SUFFIX} is not in "
                                "the mesh's key folder)") from None

    def client_names(self) -> dict[bytes, str]:
        """Admitted public key (Z85) -> the name a connection with it speaks as."""
        return {self.public_keys[name]: name for name in self.clients}


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise SecurityError(f"{name!r} cannot name a key file: use letters, digits, '_', '.' and '-'")


def create_keys(folder: Path, names: Iterable[str]) -> list[str]:
    """Write a key pair per name into `folder` (made 0700 if new), secret files 0600; returns
    the names. Refuses, writing nothing, when any of the files exists: a new key pair silently
    replacing a distributed one would lock its process out of the mesh.
    """
    names = list(dict.fromkeys(names))
    for name in names:
        _check_name(name)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    taken = [path.name for name in names for path in _files(folder, name) if path.exists()]
    if taken:
        raise SecurityError(f"{folder}: would overwrite {', '.join(taken)}; remove them or use "
                            "another folder")
    # pyzmq writes with the process umask: in a private (0700) folder no one else can open a
    # secret file before it is 0600.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".new-keys-") as private:
        for name in names:
            public, secret = (Path(p) for p in zmq.auth.create_certificates(private, name))
            secret.chmod(0o600)
            public.chmod(0o644)
            for made, final in zip((public, secret), _files(folder, name)):
                _move_new(made, final)
    return names


def _files(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"


def _move_new(source: Path, target: Path) -> None:
    """Move without replacing: a link fails when the target exists (a race with another writer)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise SecurityError(f"{target} appeared while the keys were written; nothing of it was replaced") from None
    source.unlink()


def curve_for(folder: Path, name: str, clients: Iterable[str]) -> Curve:
    """The CURVE settings of process `name` from the mesh's key folder: its secret key, every
    public key there, and the names (`clients`) whose keys its inbox admits. One call per
    process: a node passes its neighbours, the launcher every node.
    """
    public_keys = _public_keys(Path(folder))
    secret_key = _secret_key(Path(folder), name)
    public_key = zmq.curve_public(secret_key)
    if public_keys.get(name, public_key) != public_key:
        raise SecurityError(f"{folder}: {name}{PUBLIC_SUFFIX} is not the public key of "
                            f"{name}{SECRET_SUFFIX}: the pair was replaced on one side only")
    clients = frozenset(clients)
    missing = sorted(clients - public_keys.keys())
    if missing:
        raise SecurityError(f"{folder}: no public key for {', '.join(missing)} "
                            f"(expected {', '.join(n + PUBLIC_SUFFIX for n in missing)})")
    admitted = [public_keys[client] for client in clients]
    if len(set(admitted)) < len(admitted):
        raise SecurityError(f"{folder}: two of {', '.join(sorted(clients))} share a public key")
    return Curve(name, public_key, secret_key, {**public_keys, name: public_key}, clients)


def _public_keys(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        raise SecurityError(f"no key folder {folder} (make one with `dni-mesh keys {folder} TOPOLOGY`)")
    return {path.name[:-len(PUBLIC_SUFFIX)]: _read_key(path, secret=False)
            for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))}


def _secret_key(folder: Path, name: str) -> bytes:
    path = _files(folder, name)[1]
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SecurityError(f"no secret key for {name!r}: {path} is missing (only {name}'s host "
                            "holds it)") from None
    if mode & 0o077:
        raise SecurityError(f"{path} can be read by other users (mode {stat.S_IMODE(mode):04o}): "
                            f"chmod 600 {path}")
    return _read_key(path, secret=True)


def _read_key(path: Path, secret: bool) -> bytes:
    """One key (Z85) from a `zmq.auth` certificate file, checked to decode to 32 bytes."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise SecurityError(f"{path}: not a key file ({error})") from None
    key = secret_key if secret else public
    if key is None or not _is_z85_key(key):
        raise SecurityError(f"{path}: no valid {'secret' if secret else 'public'} key in it")
    return key


def _is_z85_key(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except KeyError:  # a byte outside Z85's alphabet
        return False
