"""The local channel between a site's ClientApp (a thin relay, client/app.py) and its warm service
(client/service.py): one request and one answer per connection over a Unix socket.

Only the site can use it: the socket is created with mode 0600 inside a folder of its own with mode 0700
(`WORK_DIR/service/`, or a private folder under /tmp when that path is too long for a socket), so no other local
user can connect. A frame is an 8-byte length, a JSON header, then the raw bytes of
each array the header lists (name, dtype, shape), so weights cross without pickle and without copies beyond
the socket buffers. Imports numpy only: the relay must start fast.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np

LENGTH = struct.Struct("!Q")
# what a relayed request asks (its header's "op"): a training round, a SecAgg+ round's masked-update input,
# an evaluation, the end-of-run report
TRAIN, SECURE, EVALUATE, REPORT = "train", "secure", "evaluate", "report"
MAX_SOCKET_PATH = 100  # bytes; Linux caps a Unix socket path at 108


class ServiceUnavailable(RuntimeError):
    """The site's service did not answer: not running, restarting, or it died during the request."""


class ServiceError(RuntimeError):
    """The site's service answered with an error (its reason is the message)."""


def _recv_exact(sock: socket.socket, n: int, into: memoryview | None = None) -> bytes | memoryview:
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = sock.recv_into(buf[got:], n - got)
        if k == 0:
            raise ConnectionError(f"the other end closed the channel after {got} of {n} bytes")
        got += k
    return buf


def send_frame(sock: socket.socket, header: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    head = json.dumps({**header, "_arrays": [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]}).encode()
    sock.sendall(LENGTH.pack(len(head)) + head)
    for a in arrays.values():
        if a.nbytes:
            sock.sendall(memoryview(a).cast("B"))


def recv_frame(sock: socket.socket) -> tuple[dict, dict[str, np.ndarray]]:
    (n,) = LENGTH.unpack(bytes(_recv_exact(sock, LENGTH.size)))
    header = json.loads(bytes(_recv_exact(sock, n)))
    arrays = {}
    for name, dtype, shape in header.pop("_arrays"):
        a = np.empty(shape, dtype=np.dtype(dtype))
        if a.nbytes:
            _recv_exact(sock, a.nbytes, memoryview(a).cast("B"))
        arrays[name] = a
    return header, arrays


def connect(path: Path | str, wait_s: float) -> socket.socket:
    """A connection to the service; while it is being restarted (no socket, or nobody listening yet) keep trying
    for up to `wait_s` seconds, so a restart delays a round instead of failing it."""
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(f"the site service at {path} is not running ({e.strerror or e}) and did "
                                         f"not come back within {wait_s:.0f} s; see the site's service.log") from None
            time.sleep(0.2)


def call(path: Path | str, header: dict, arrays: dict[str, np.ndarray], timeout: float | None = None,
         wait_s: float = 120.0) -> tuple[dict, dict[str, np.ndarray]]:
    """One request to the service at `path` -> its answer; ServiceError when it answered with an error,
    ServiceUnavailable when it could not be reached in `wait_s` or went away before answering (a request it
    died in is not repeated: the round fails for this site, and the restarted service takes the next)."""
    sock = connect(path, wait_s)
    sock.settimeout(timeout)
    try:
        try:
            send_frame(sock, header, arrays)
            answer, out = recv_frame(sock)
        except (OSError, ConnectionError) as e:
            raise ServiceUnavailable(f"the site service at {path} went away during the request ({e}); "
                                     "`m3fm-client start` restarts it") from None
    finally:
        sock.close()
    if "error" in answer:
        raise ServiceError(str(answer["error"]))
    return answer, out


def socket_path(work_dir: Path) -> Path:
    """Where a site's service listens: WORK_DIR/service/site.sock, or a fresh private folder under /tmp."""
    path = Path(work_dir).resolve() / "service" / "site.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    import tempfile

    return Path(tempfile.mkdtemp(prefix="m3fm-site-")) / "site.sock"


def listen(path: Path) -> socket.socket:
    """A listening socket at `path` that only this user can connect to (a stale socket file is replaced)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # a folder of its own: the socket file's mode alone is not honoured everywhere
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no window in which another user could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(4)
    return sock
