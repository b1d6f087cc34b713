"""The certificate ``ktls serve`` uses when it is given none: made for the session, or an embedded default.

With the ``openssl`` command available, a fresh P-256 self-signed certificate for ``localhost`` is made for
each run, written into anonymous in-memory files (``memfd_create``) — its key never touches a disk. Without
it, the embedded certificate below is used: its private key is public (it is in this file), so it protects
nothing beyond a quick local try-out; the banner says which one is in use and prints its fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import ssl
import subprocess

__all__ = ["SessionCertificate", "load_default_certificate"]


@dataclasses.dataclass(frozen=True)
class SessionCertificate:
    #: ``/proc/self/fd/N`` paths of in-memory files (or the user's own files).
    cert_path: str
    key_path: str
    #: SHA-256 of the DER certificate, ``AA:BB:…``.
    fingerprint: str
    origin: str


def _memfd_with(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def fingerprint(cert_pem: str) -> str:
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _generate() -> tuple[bytes, bytes] | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert_fd = os.memfd_create("ktls-serve-cert", 0)
    key_fd = os.memfd_create("ktls-serve-key", 0)
    try:
        command = [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "7", "-subj", "/CN=localhost/O=ktls serve (this session)",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
            "-keyout", f"/dev/fd/{key_fd}", "-out", f"/dev/fd/{cert_fd}",
        ]  # fmt: skip
        done = subprocess.run(command, pass_fds=(cert_fd, key_fd), capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            return None
        return os.pread(cert_fd, 1 << 16, 0), os.pread(key_fd, 1 << 16, 0)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        os.close(cert_fd)
        os.close(key_fd)


def load_default_certificate() -> SessionCertificate:
    """A certificate for this session (see the module docstring); its files live as long as the process."""
    generated = _generate()
    if generated is not None:
        cert, key = generated
        origin = "self-signed for this session"
    else:
        cert, key = CERT_PEM.encode(), KEY_PEM.encode()
        origin = "embedded default (its key is public: for local try-outs only)"
    cert_fd = _memfd_with("ktls-serve-cert", cert)
    key_fd = _memfd_with("ktls-serve-key", key)
    return SessionCertificate(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}", fingerprint(cert.decode()), origin)


# Made once with the `cryptography` package: P-256, CN=localhost, SAN localhost/127.0.0.1/::1, 10 years.
CERT_PEM = """-----BEGIN CERTIFICATE-----
MIIB0zCCAXmgAwIBAgIUTq4wYtCpvNF5QM2N4g4eQJ5ua2YwCgYIKoZIzj0EAwIw
SDESMBAGA1UEAwwJbG9jYWxob3N0MTIwMAYDVQQKDClrdGxzIHNlcnZlIChlbWJl
ZGRlZCBkZWZhdWx0OyBub3Qgc2VjcmV0KTAeFw0yNjExMDEwMDAwMDBaFw0zNjEw
MjkwMDAwMDBaMEgxEjAQBgNVBAMMCWxvY2FsaG9zdDEyMDAGA1UECgwpa3RscyBz
ZXJ2ZSAoZW1iZWRkZWQgZGVmYXVsdDsgbm90IHNlY3JldCkwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAAT9/puRBOw55jE00i4Ra7w98P5nT4lgdEEThN8V+inMOIMF
SThJCJVJD/touBuGwlPIdBt2WV/YTRc6+7hk6Mkso0EwPzAsBgNVHREEJTAjggls
b2NhbGhvc3SHBH8AAAGHEAAAAAAAAAAAAAAAAAAAAAEwDwYDVR0TAQH/BAUwAwEB
/zAKBggqhkjOPQQDAgNIADBFAiEA8tpIHRNrDqLDc3tbVIaldu3FTdWgK0KvPpBd
ubxnwZ8CIHdIN9p09jadTQrdNqiG/f/Mjv9yLODJ2ow5bFblATQl
-----END CERTIFICATE-----
"""

KEY_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgN/YgKCdZY/kmpJ4C
Le6JMwU2kf14Gb5k4cbtKKlc8Z2hRANCAAT9/puRBOw55jE00i4Ra7w98P5nT4lg
dEEThN8V+inMOIMFSThJCJVJD/touBuGwlPIdBt2WV/YTRc6+7hk6Mks
-----END PRIVATE KEY-----
"""
