"""A blocking HTTPS server, a thread per connection, on kernel TLS; it sends one file with ``sendfile``.

``python examples/blocking_server.py FILE --port 8443 --cert cert.pem --key key.pem``; stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import threading

import ktls


def handle(sock: socket.socket, context: ssl.SSLContext, path: str) -> None:
    with ktls.wrap_socket(sock, context, server_side=True) as stream:
        request = b""
        while b"\r\n\r\n" not in request:
            data = stream.recv(4096)
            if not data:
                return
            request += data
        size = os.path.getsize(path)
        stream.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        with open(path, "rb") as file:
            stream.sendfile(file)  # os.sendfile when the kernel sends: the file never enters Python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    with socket.create_server(("127.0.0.1", args.port)) as listener:
        print(f"serving {args.file} on https://127.0.0.1:{args.port}/", flush=True)
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=handle, args=(sock, context, args.file), daemon=True).start()


if __name__ == "__main__":
    main()
