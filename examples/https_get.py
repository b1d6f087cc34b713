"""Download a URL over HTTPS with kernel TLS: ``python examples/https_get.py https://host:port/path [--insecure]``.

The handshake is Python's ``ssl``; then the kernel decrypts every record and ``recv`` reads plaintext. Prints
what the kernel took (or why not) on stderr and writes the body to stdout.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import urllib.parse

import ktls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--insecure", action="store_true", help="do not verify the certificate (self-signed)")
    args = parser.parse_args()
    url = urllib.parse.urlsplit(args.url)
    context = ssl.create_default_context()
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection((url.hostname, url.port or 443), timeout=30)
    with ktls.wrap_socket(sock, context, server_hostname=url.hostname) as stream:
        print(
            f"kernel tx={stream.kernel_tx} rx={stream.kernel_rx} ({stream.fallback_reason or 'kTLS'})", file=sys.stderr
        )
        path = url.path or "/"
        stream.sendall(f"GET {path} HTTP/1.1\r\nHost: {url.hostname}\r\nConnection: close\r\n\r\n".encode())
        response = bytearray()
        while data := stream.recv(65536):
            response += data
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    print(head.split(b"\r\n")[0].decode(), file=sys.stderr)
    sys.stdout.buffer.write(body)
    return 0 if head.startswith(b"HTTP/1.1 200") else 1


if __name__ == "__main__":
    sys.exit(main())
