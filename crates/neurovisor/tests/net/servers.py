"""The test's "internet": HTTP on 80 and 8080, HTTPS (test CA) on 443 and a UDP
echo on 9999, on every address of the network namespace it is started in
(a namespace the test created, with no route off the machine). Prints
"ready" once listening; exits when its stdin closes."""
import http.server
import socket
import socketserver
import ssl
import sys
import threading


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
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
