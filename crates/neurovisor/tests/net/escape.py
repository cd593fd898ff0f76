# Runs inside a VM started with --network --allow-host allowed.test
# --allow-host second.test --allow-host rebind.test: every way out the test
# knows, each recorded as ok:<what came back> or refused:<error>.
import json
import os
import socket
import ssl
import struct
import urllib.request

CA = """@CA@"""
R = {}


def attempt(name, fn):
    try:
        R[name] = "ok:" + str(fn())[:200]
    except Exception as e:  # every failure is a refusal, whatever its kind
        R[name] = f"refused:{type(e).__name__}:{str(e)[:120]}"


def read_all(s):
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
    if not data:
        raise ConnectionError("closed without an answer")
    return data.decode(errors="replace").splitlines()[-1]


def http(ip, port, host):
    with socket.create_connection((ip, port), timeout=5) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return read_all(s)


def tls(ip, port, sni):
    ctx = ssl.create_default_context(cadata=CA)
    # The client would refuse a mismatch itself; the gateway must refuse first.
    ctx.check_hostname = False
    with socket.create_connection((ip, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            return read_all(s)


def dns(server, name, qtype):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q, (server, 53))
    r, _ = s.recvfrom(4096)
    rcode, answers = r[3] & 0xF, struct.unpack(">H", r[6:8])[0]
    if rcode != 0 or answers == 0:
        raise LookupError(f"rcode {rcode}, {answers} answers")
    return f"{answers} answers"


def udp(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"x", (ip, port))
    return s.recvfrom(100)[0]


def icmp(ip):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    s.settimeout(2)
    s.sendto(struct.pack(">BBHHH", 8, 0, 0, 1, 1) + b"ping", (ip, 0))
    return s.recvfrom(100)[0]


attempt("interfaces", lambda: ",".join(sorted(os.listdir("/sys/class/net"))))
attempt("resolve_allowed", lambda: socket.gethostbyname("allowed.test"))
attempt("http_allowed", lambda: urllib.request.urlopen("http://allowed.test/", timeout=5).read().decode())
attempt("https_allowed", lambda: urllib.request.urlopen(
    "https://allowed.test/", timeout=5, context=ssl.create_default_context(cadata=CA)).read().decode())
attempt("resolve_second", lambda: socket.gethostbyname("second.test"))
attempt("direct_ip", lambda: http("203.0.113.11", 80, "203.0.113.11"))
attempt("other_port", lambda: http("203.0.113.10", 8080, "allowed.test"))
attempt("metadata_v4", lambda: http("169.254.169.254", 80, "169.254.169.254"))
attempt("metadata_v6", lambda: socket.create_connection(("fd00:ec2::254", 80), timeout=3))
attempt("private", lambda: http("10.77.0.20", 80, "allowed.test"))
attempt("upstream_host", lambda: http("192.0.2.1", 80, "allowed.test"))
attempt("gateway_ssh", lambda: http("10.200.0.1", 22, "allowed.test"))
attempt("gateway_filter_port", lambda: http("10.200.0.1", 15001, "allowed.test"))
attempt("resolve_other", lambda: socket.gethostbyname("other.test"))
attempt("dns_txt", lambda: dns("10.200.0.1", "allowed.test", 16))
attempt("dns_tunnel", lambda: dns("10.200.0.1", "x" * 63 + ".exfil.other.test", 1))
attempt("dns_upstream_direct", lambda: dns("192.0.2.2", "other.test", 1))
attempt("host_mismatch", lambda: http("203.0.113.10", 80, "other.test"))
attempt("sni_mismatch", lambda: tls("203.0.113.10", 443, "other.test"))
attempt("fronting_host", lambda: http("203.0.113.10", 80, "second.test"))
attempt("fronting_sni", lambda: tls("203.0.113.10", 443, "second.test"))
attempt("rebinding", lambda: socket.gethostbyname("rebind.test"))
attempt("ipv6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
attempt("icmp", lambda: icmp("203.0.113.10"))
attempt("udp", lambda: udp("203.0.113.10", 9999))
print(json.dumps(R))
