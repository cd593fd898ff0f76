"""The test's "internet": HTTP on 80 and 8080, HTTPS (test CA) on 443 and a UDP
echo on 9999, on every address of the network namespace it is started in
(a namespace the test created, with no route off the machine). A request
whose Host has a directory under the files root (argv[3]) gets that
directory's files (a package index, a git repository over dumb HTTP); any
other gets a hello naming the address and Host it arrived with. Prints
"ready" once listening; exits when its stdin closes."""
import http.server
import os
import socket
import socketserver
import ssl
import sys
import threading


ROOT = sys.argv[3]


class Hello(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=ROOT, **kwargs)

    def translate_path(self, path):
        host = (self.headers.get("Host") or "").split(":")[0]
        return os.path.join(ROOT, host, super().translate_path(path)[len(ROOT):].lstrip("/"))

    def do_GET(self):
        host = (self.headers.get("Host") or "").split(":")[0]
        if host and os.path.isdir(os.path.join(ROOT, host)):
            return super().do_GET()
        here = self.connection.getsockname()
        body = f"hello from {here[0]}:{here[1]} host={self.headers.get('Host')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def udp_echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 9999))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"echo:" + data, peer)


def main():
    cert, key = sys.argv[1], sys.argv[2]
    servers = [Server(("0.0.0.0", 80), Hello), Server(("0.0.0.0", 8080), Hello)]
    tls = Server(("0.0.0.0", 443), Hello)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    servers.append(tls)
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    threading.Thread(target=udp_echo, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()


main()
