"""The benchmark's emulated link (infra/bench/links.py): rate and delay through the proxy, both ways, and a change
mid-stream. Short on purpose (about 5 s): the per-link accuracy report is `check_link` in docs/results/partition.md."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from infra.bench.links import (
    EmulatedLink,
    LinkCheck,
    LinkSpec,
    _recv_exact,
    _TestServer,
    check_link,
)

FAST = LinkSpec("test-20mbit-20ms", 20e6, 0.010)  # RTT 20 ms


def test_rate_and_delay_within_bounds_both_ways():
    c = check_link(FAST, transfer_s=1.0, pings=10)
    # 2.5 MB at 20 Mbit/s plus the RTT: 1.02 s each way (observed +0.2..+1.5 %, more with the 2 cores shared;
    # an unpaced proxy would take ~0.02 s, one pacing twice: +100 %)
    assert abs(LinkCheck.error(c.upload_s)) < 0.1 and abs(LinkCheck.error(c.download_s)) < 0.1
    # echo of 64 B: 20 ms plus the proxy's own ~0.3 ms (observed 20.4-20.7 ms); never early
    assert c.rtt_s[1] <= c.rtt_s[0] < c.rtt_s[1] + 0.005


def test_rate_change_applies_to_later_bytes_and_errors_name_values():
    server = _TestServer()
    try:
        with EmulatedLink.from_spec(FAST, server.address) as link, socket.create_connection(link.address) as sock:
            link.set(rate_bps=5e6, delay_s=0.002)
            n = 5e6 / 8 * 0.5  # half a second at the new rate
            t0 = time.perf_counter()
            sock.sendall(b"U" + struct.pack("<Q", int(n)) + bytes(int(n)))
            _recv_exact(sock, 1)
            took = time.perf_counter() - t0
            assert 0.5 < took < 0.5 * 1.1 + 0.004 + 0.005  # observed 0.505 s; the old 20 Mbit/s would be 0.13 s
            assert link.bytes_up == 9 + int(n) and link.bytes_down == 1
    finally:
        server.close()
    with pytest.raises(ValueError, match="need rate_bps > 0 and 0 <= delay_s < 10, got 0.0"):
        LinkSpec("bad", 0.0, 0.01)
    with pytest.raises(RuntimeError, match="link x is not started"):
        _ = EmulatedLink(1e6, 0.0, ("127.0.0.1", 1), "x").address
