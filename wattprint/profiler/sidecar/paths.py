"""The sidecar's private files: its runtime directory (0700, ours), state files read back only when they
are ours and private, and the key that signs per-request energy URLs.

* :func:`ensure_private_dir` creates a directory 0700 or accepts an existing one only if it is a real
  directory (not a symlink), owned by this user and closed to everyone else (one that is merely
  readable by others is tightened to 0700; one that others can write to is refused).
* Files are written with :func:`wattprint.files.atomic_write` (``mkstemp``: ``O_CREAT|O_EXCL|O_NOFOLLOW``,
  a random name, then a rename, which replaces a planted symlink instead of following it) with mode 0600.
* :func:`read_private` opens with ``O_NOFOLLOW|O_NONBLOCK`` and reads only a regular file owned by this
  user, with no group or other permission bits, up to a size limit; anything else is refused.
"""

from __future__ import annotations

import os
import secrets
import stat

from wattprint.errors import ConfigError
from wattprint.files import atomic_write

KEY_NAME = "url.key"
KEY_BYTES = 32
MAX_STATE_BYTES = 4 << 20


def ensure_private_dir(path: str) -> str:
    """Create ``path`` (and missing parents) with mode 0700, or check an existing one; returns it.
    Raises :class:`ConfigError` when it is a symlink, not a directory, another user's, or writable by others."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the private directory {path}: {exc.strerror or exc}") from exc
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory (a symlink?); refusing to use it")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to this user; refusing to use it")
    if st.st_mode & 0o022:
        raise ConfigError(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                          "refusing to use it (make it 0700)")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def is_private_dir(path: str) -> bool:
    """Whether ``path`` is a directory of ours that no one else can write to."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def prepare_socket_dir(socket_file: str | None, runtime_dir: str) -> str:
    """Create and check the default socket's directory (``runtime_dir``) when the socket is there; return
    where the URL key belongs: beside the socket when its directory is private, else in ``runtime_dir``."""
    sock_dir = os.path.dirname(socket_file) if socket_file else None
    if sock_dir and os.path.abspath(sock_dir) == os.path.abspath(runtime_dir):
        ensure_private_dir(sock_dir)
    key_dir = sock_dir if sock_dir and is_private_dir(sock_dir) else ensure_private_dir(runtime_dir)
    return os.path.join(key_dir, KEY_NAME)


def write_private(path: str, data: bytes) -> None:
    """Write ``path`` whole, mode 0600 (raises OSError)."""
    atomic_write(path, data, mode=0o600)


def read_private(path: str, max_bytes: int = MAX_STATE_BYTES) -> bytes | None:
    """The content of ``path`` if it is a private regular file of ours (None when it does not exist).
    Raises :class:`ConfigError` for a symlink, a non-regular file, another user's or a shared file, or
    one over ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror or exc} (a symlink?)") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        if st.st_uid != os.getuid():
            raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to this user")
        if st.st_mode & 0o077:
            raise ConfigError(f"{path} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):o})")
        if st.st_size > max_bytes:
            raise ConfigError(f"{path} is larger than {max_bytes} bytes")
        chunks, left = [], max_bytes + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise ConfigError(f"{path} is larger than {max_bytes} bytes")
        return data
    finally:
        os.close(fd)


def load_or_create_key(path: str) -> bytes:
    """The URL-signing key in ``path`` (hex), created (0600, ``O_EXCL|O_NOFOLLOW``) when missing."""
    data = read_private(path, 4096)
    if data is None:
        key = secrets.token_hex(KEY_BYTES).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            data = read_private(path, 4096)
        except OSError as exc:
            raise ConfigError(f"cannot create the key file {path}: {exc.strerror or exc}") from exc
        else:
            try:
                os.write(fd, key + b"\n")
            finally:
                os.close(fd)
            return key
    key = (data or b"").strip()
    if len(key) < 32:
        raise ConfigError(f"{path} holds no usable key (at least 32 characters)")
    return key
