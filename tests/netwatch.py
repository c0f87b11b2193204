"""Record every packet a network namespace tries to send out: run inside the namespace, attached to
its TUN device, which holds the namespace's default route (IPv4 and IPv6).

    ip netns exec NS python tests/netwatch.py tun0 LOG

Each outbound packet becomes a JSON line in LOG: DNS questions with the name asked (UDP to port 53,
whatever the resolver; the namespace's resolv.conf points at an address behind the TUN), TCP
connection attempts (SYN) and any other UDP, with the destination. Nothing is answered, so every
attempt fails as it would offline; the point is that it is seen, whether Python, C++ (ONNX Runtime)
or a subprocess made it. Prints "ready" once attached.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def dns_name(payload: bytes) -> str:
    """The first question's name of a DNS query."""
    labels, i = [], 12
    while i < len(payload) and payload[i]:
        n = payload[i]
        labels.append(payload[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels)


def describe(packet: bytes) -> dict | None:
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        proto, dst = packet[9], socket.inet_ntop(socket.AF_INET, packet[16:20])
        body = packet[ihl:]
    elif version == 6:
        proto, dst = packet[6], socket.inet_ntop(socket.AF_INET6, packet[24:40])
        body = packet[40:]
    else:
        return None
    if proto == 17 and len(body) >= 8:  # UDP
        port = struct.unpack("!H", body[2:4])[0]
        if port == 53:
            return {"kind": "dns", "name": dns_name(body[8:]), "to": dst}
        return {"kind": "udp", "to": f"{dst}:{port}"}
    if proto == 6 and len(body) >= 14:  # TCP
        port, flags = struct.unpack("!H", body[2:4])[0], body[13]
        if flags & 0x02:  # SYN
            return {"kind": "tcp", "to": f"{dst}:{port}"}
        return None
    if proto in (58, 1):  # ICMP: router/neighbour chatter of the interface itself, not the program's
        return None
    return {"kind": f"ip-proto-{proto}", "to": dst}


def main() -> None:
    name, log = sys.argv[1], sys.argv[2]
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    print("ready", flush=True)
    with open(log, "a", buffering=1) as out:
        while True:
            seen = describe(os.read(fd, 65535))
            if seen is not None:
                out.write(json.dumps(seen) + "\n")


if __name__ == "__main__":
    main()
