"""The cluster over TLS (`rediss://`), against a real redis-server that listens with TLS only.

A throwaway CA and a certificate for 127.0.0.1 (an IP address SAN) are made with openssl in a
temporary directory. The chat servers run in a child process whose environment says which roots
to trust: the Redis client (rustls, with rustls-native-certs) reads SSL_CERT_FILE and
SSL_CERT_DIR at each connection, and setting them from Python while a server's threads connect
would race with those reads, so each case gets a process of its own, its environment set before
it starts.

Without redis-server or openssl these tests skip, saying how to install them; with CI=true they
fail instead."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PASSWORD = "tls-test-secret"
# How long a child waits for the cluster to connect, or watches it fail to.
CONNECT_DEADLINE = 10.0
REFUSED_WATCH = 2.5
MESSAGE = b"over tls"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _require(tool: str) -> str:
    """The path of `tool`; a skip without it (a failure with CI=true)."""
    path = shutil.which(tool)
    if path is None:
        why = (
            f"`{tool}` is not installed (Debian and Ubuntu: apt-get install {tool}); the "
            "cluster's TLS tests need it"
        )
        if _in_ci():
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    return path


@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca: Path  # signed the server's certificate
    other_ca: Path  # signed nothing here
    ca_dir: Path  # holds only a copy of `ca`, for SSL_CERT_DIR


def _openssl(openssl: str, cwd: Path, *args: str) -> None:
    out = subprocess.run(
        [openssl, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr}"


def _make_certificates(openssl: str, where: Path) -> None:
    """ca.crt, other-ca.crt, and server.crt / server.key: 127.0.0.1's, signed by ca.crt."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        _openssl(
            openssl,
            where,
            "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt",
            "-days", "2", "-subj", f"/CN=udpchat test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    _openssl(
        openssl, where,
        "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    (where / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        openssl, where,
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", "1", "-days", "2", "-extfile", "server.ext", "-out", "server.crt",
    )  # fmt: skip


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int, ca: Path) -> bool:
    """Whether a TLS Redis on `port` with a certificate from `ca` answers PING (checked with
    Python's ssl module, OpenSSL: the certificates are sound apart from the client under test)."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"AUTH %s\r\nPING\r\n" % PASSWORD.encode())
            reply = b""
            while b"+PONG" not in reply:
                chunk = tls.recv(1024)
                if not chunk:
                    return False
                reply += chunk
            return True
    except (OSError, ssl.SSLError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A redis-server with TLS only (`--port 0`), a password and no persistence, on a free
    loopback port; stopped by its pid at the end."""
    redis_server = _require("redis-server")
    openssl = _require("openssl")
    where = tmp_path_factory.mktemp("redis-tls")
    _make_certificates(openssl, where)
    ca_dir = where / "trusted"
    ca_dir.mkdir()
    shutil.copy(where / "ca.crt", ca_dir / "ca.crt")
    log = where / "redis.log"
    for _ in range(3):  # another program may take the free port first
        port = _free_tcp_port()
        with log.open("wb") as out:
            process = subprocess.Popen(
                [redis_server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                 "--tls-cert-file", str(where / "server.crt"),
                 "--tls-key-file", str(where / "server.key"),
                 "--tls-ca-cert-file", str(where / "ca.crt"), "--tls-auth-clients", "no",
                 "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                 "--dir", str(where)],
                stdout=out, stderr=subprocess.STDOUT, cwd=where,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(port, where / "ca.crt"):
                break
            time.sleep(0.05)
        else:
            _stop(process)
            continue
        break
    else:
        pytest.fail(f"redis-server with TLS did not start:\n{log.read_text()}")
    try:
        yield TlsRedis(port, where / "ca.crt", where / "other-ca.crt", ca_dir)
    finally:
        _stop(process)


def _environment(**trust: str) -> dict[str, str]:
    """This process's environment with SSL_CERT_FILE and SSL_CERT_DIR as `trust` says (neither
    when it is empty: the system's roots)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env.update(trust)
    return env


def _in_child(case: str, url: str, env: dict[str, str]) -> dict[str, Any]:
    """Runs this file's `case` in a new Python process with `env`; returns what it reports."""
    out = subprocess.run(
        [sys.executable, __file__, case, url],
        env=env,
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


def _url(redis: TlsRedis, host: str = "127.0.0.1") -> str:
    return f"rediss://:{PASSWORD}@{host}:{redis.port}"


@pytest.mark.parametrize("trust", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_a_message_crosses_servers_over_tls(tls_redis: TlsRedis, trust: str) -> None:
    where = tls_redis.ca if trust == "SSL_CERT_FILE" else tls_redis.ca_dir
    result = _in_child("chat", _url(tls_redis), _environment(**{trust: str(where)}))
    assert result["connected"], result
    # The client of the other server gets the very bytes the sender's own server sent it.
    assert result["local"] == result["expected"], result
    assert result["remote"] == result["expected"], result
    a, b = result["stats"]
    assert a["cluster_published"] == 1 and b["cluster_received"] == 1, result
    assert a["cluster_errors"] == b["cluster_errors"] == 0, result
    shown = f"connected to rediss://:***@127.0.0.1:{tls_redis.port}"
    infos = [m for name, level, m in result["records"] if name == "udpchat.cluster"]
    assert sum(m.startswith(shown) for m in infos) == 2, result["records"]
    assert not any(PASSWORD in m for _, _, m in result["records"])


REFUSALS = {
    # SSL_CERT_FILE names a CA, but not the one that signed Redis's certificate.
    "untrusted CA": ("127.0.0.1", "other_ca", "invalid peer certificate: UnknownIssuer"),
    # Neither variable: the system's roots (Debian's bundle), which do not have the test CA.
    "system roots": ("127.0.0.1", None, "invalid peer certificate: UnknownIssuer"),
    # The right CA, but the certificate is 127.0.0.1's, not localhost's.
    "wrong name": ("localhost", "ca", 'certificate not valid for name "localhost"'),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_redis_whose_certificate_fails_is_never_joined(tls_redis: TlsRedis, case: str) -> None:
    host, trusted, reason = REFUSALS[case]
    trust = {} if trusted is None else {"SSL_CERT_FILE": str(getattr(tls_redis, trusted))}
    result = _in_child("refused", _url(tls_redis, host), _environment(**trust))
    assert not result["ever_connected"], result
    assert 0 < result["errors_early"] < result["errors_late"], result  # it keeps trying
    # Its own clients are served all the while.
    assert result["local"] == result["expected"], result
    warnings = [
        m
        for name, level, m in result["records"]
        if name == "udpchat.cluster" and level == logging.WARNING
    ]
    assert len(warnings) == 1, result["records"]
    assert warnings[0].startswith(f"cannot reach Redis at rediss://:***@{host}:"), warnings
    assert reason in warnings[0], warnings
    assert not any(PASSWORD in m for _, _, m in result["records"])


def test_tls_urls_are_taken_but_never_without_certificate_checks() -> None:
    from udpchat import ChatServerUdp

    # Nothing connects before start(): no Redis needed here.
    ChatServerUdp(port=0, cluster="rediss://127.0.0.1:6380")
    ChatServerUdp(port=0, cluster="rediss://user:pw@redis.example:6380/0")
    with pytest.raises(ValueError, match="without certificate checks"):
        ChatServerUdp(port=0, cluster="rediss://127.0.0.1:6380#insecure")
    with pytest.raises(ValueError, match=re.escape("rediss://127.0.0.1:6380#other")):
        ChatServerUdp(port=0, cluster="rediss://127.0.0.1:6380#other")


# What the child process runs: `python test_cluster_tls.py CASE URL`, one JSON line out.


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _peer(server: Any) -> tuple[socket.socket, bytes]:
    """A plain UDP client registered on `server`, and the `ack:` its message gets."""
    sock = socket.socket(type=socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    sock.sendto(b"reg", server.address)
    me = sock.getsockname()
    assert _wait(lambda: me in server.clients, 5), server.clients
    return sock, b"ack: %s %d\n%s\n" % (me[0].encode(), me[1], MESSAGE)


def _receive(sock: socket.socket) -> str | None:
    try:
        return sock.recv(70_000).decode("latin-1")
    except TimeoutError:
        return None


def _cluster_stats(server: Any) -> dict[str, int]:
    return {k: v for k, v in server.stats().items() if k.startswith("cluster_")}


def _chat(url: str) -> dict[str, Any]:
    """Two servers on `url`; a message from a client of the first reaches a client of the
    second."""
    from udpchat import ChatServerUdp

    servers = [ChatServerUdp(port=0, cluster=url) for _ in range(2)]
    socks: list[socket.socket] = []
    try:
        for server in servers:
            server.start()
        connected = _wait(
            lambda: all(s.stats()["cluster_connected"] for s in servers), CONNECT_DEADLINE
        )
        (a, expected), (b, _) = _peer(servers[0]), _peer(servers[1])
        socks += [a, b]
        assert servers[0].address is not None
        a.sendto(MESSAGE, servers[0].address)
        local, remote = _receive(a), _receive(b)
        # The counters move after the delivery: the first server counts its publication once
        # Redis has answered the PUBLISH, which may be after the second server relayed it.
        _wait(
            lambda: (
                servers[0].stats()["cluster_published"] > 0
                and servers[1].stats()["cluster_received"] > 0
            ),
            2,
        )
        stats = [_cluster_stats(s) for s in servers]
    finally:
        for server in servers:
            server.stop()
        for sock in socks:
            sock.close()
    return {
        "connected": connected,
        "expected": expected.decode("latin-1"),
        "local": local,
        "remote": remote,
        "stats": stats,
    }


def _refused(url: str) -> dict[str, Any]:
    """One server on `url`, watched for REFUSED_WATCH seconds while it fails to connect."""
    from udpchat import ChatServerUdp

    server = ChatServerUdp(port=0, cluster=url)
    server.start()
    try:
        ever_connected, errors_early = False, 0
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < REFUSED_WATCH:
            stats = server.stats()
            ever_connected |= bool(stats["cluster_connected"])
            if elapsed < REFUSED_WATCH / 4:
                errors_early = int(stats["cluster_errors"])
            time.sleep(0.01)
        sock, expected = _peer(server)
        assert server.address is not None
        with sock:
            sock.sendto(MESSAGE, server.address)
            local = _receive(sock)
        errors_late = int(server.stats()["cluster_errors"])
    finally:
        server.stop()
    return {
        "ever_connected": ever_connected,
        "errors_early": errors_early,
        "errors_late": errors_late,
        "expected": expected.decode("latin-1"),
        "local": local,
    }


def _child(case: str, url: str) -> None:
    records: list[tuple[str, int, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.name, record.levelno, record.getMessage()))

    logger = logging.getLogger("udpchat")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)  # before any server: the Rust side caches the level
    result = _chat(url) if case == "chat" else _refused(url)
    result["records"] = records
    print(json.dumps(result))


if __name__ == "__main__":
    _child(*sys.argv[1:])
