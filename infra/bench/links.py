"""Emulated links for benchmarks: an in-process TCP proxy on 127.0.0.1 pacing and delaying bytes, both ways.

``EmulatedLink(rate_bps, delay_s, upstream)`` listens on a free loopback port and forwards every
connection to ``upstream`` (a broker). Each direction is a serializer followed by a fixed delay,
the model of one link: a chunk read at time t leaves the serializer at
``dep = max(t, previous dep) + 8 * len / rate_bps`` and is written out at ``dep + delay_s``. Chunks are
cut into quanta of about 2 ms of serialization (at least 1,500 bytes), so a large write trickles
out at the rate instead of arriving whole. asyncio's timers round up to whole milliseconds, so the
writer sleeps the last millisecond of each wait with ``time.sleep`` (blocking the loop that long).
The serializer's queue is bounded
(``buffer_bytes``): past it the proxy stops reading, and TCP pushes back on the sender; nothing is
dropped. ``set(rate_bps, delay_s)`` changes the link mid-stream (later bytes only). The event loop
runs in one daemon thread; ``check_link`` measures a link against a timed transfer and echo.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_SPIN_S = 0.001  # the writer sleeps the last this much of a wait with time.sleep (it blocks the loop that long)


@dataclass(frozen=True)
class LinkSpec:
    """A link to emulate: rate in bit/s (each way), one-way delay in seconds (RTT = 2 * delay_s)."""

    name: str
    rate_bps: float
    delay_s: float

    def __post_init__(self):
        if not self.rate_bps > 0 or not 0 <= self.delay_s < 10:
            raise ValueError(f"link {self.name}: need rate_bps > 0 and 0 <= delay_s < 10, got {self.rate_bps!r}, "
                             f"{self.delay_s!r}")


# The benchmark's links: RTT = 2 x the one-way delay.
BENCH_LINKS = (LinkSpec("1mbit-50ms", 1e6, 0.025), LinkSpec("10mbit-10ms", 10e6, 0.005),
               LinkSpec("100mbit-1ms", 100e6, 0.0005))


class _Direction:
    """One way of one connection: read, schedule each quantum's delivery time, write it at that time."""

    def __init__(self, link: EmulatedLink, reader, writer, counter: str):
        self.link, self.reader, self.writer, self.counter = link, reader, writer, counter
        self.queue: asyncio.Queue = asyncio.Queue()
        self.next_free = 0.0     # when the serializer is free again (loop time, s)
        self.last_deliver = 0.0  # deliveries stay in order when the delay shrinks

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                rate, delay, buffer_bytes = self.link.rate_bps, self.link.delay_s, self.link.buffer_bytes
                backlog_s = self.next_free - loop.time()
                if backlog_s > buffer_bytes * 8 / rate:  # the serializer's queue is full: stop reading
                    await asyncio.sleep(backlog_s - buffer_bytes * 8 / rate)
                    continue
                data = await self.reader.read(65536)
                if not data:
                    break
                quantum = max(1500, int(rate / 8 * 2e-3))  # 2 ms of serialization, at least a packet
                for i in range(0, len(data), quantum):
                    piece = data[i:i + quantum]
                    self.next_free = max(loop.time(), self.next_free) + 8 * len(piece) / rate
                    self.last_deliver = max(self.next_free + delay, self.last_deliver)
                    self.queue.put_nowait((self.last_deliver, piece))
        except (ConnectionError, OSError):
            pass
        finally:
            self.queue.put_nowait((self.last_deliver, b""))

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                deliver, data = await self.queue.get()
                while data and not self.queue.empty() and self.queue._queue[0][0] <= deliver:  # coalesce due pieces
                    nxt = self.queue.get_nowait()[1]
                    if not nxt:
                        self.queue._queue.appendleft((deliver, b""))
                        break
                    data += nxt
                wait = deliver - loop.time()
                if wait > _SPIN_S:
                    await asyncio.sleep(wait - _SPIN_S)
                rest = deliver - loop.time()
                if rest > 0:  # the last millisecond blocking: asyncio's timers round up to whole milliseconds
                    time.sleep(rest)  # noqa: ASYNC251  (on purpose, at most _SPIN_S)
                if not data:
                    break
                # Counted before the peer can see the bytes.
                setattr(self.link, self.counter, getattr(self.link, self.counter) + len(data))
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writer.close()


class EmulatedLink:
    """A shaping TCP proxy from 127.0.0.1:<port> to `upstream`; use as a context manager or start()/stop()."""

    def __init__(self, rate_bps: float, delay_s: float, upstream: tuple[str, int], name: str = "link",
                 buffer_bytes: int = 65536):
        LinkSpec(name, rate_bps, delay_s)  # validates
        if buffer_bytes < 1500:
            raise ValueError(f"link {name}: buffer_bytes must be >= 1500, got {buffer_bytes}")
        self.name, self.upstream, self.buffer_bytes = name, upstream, buffer_bytes
        self.rate_bps, self.delay_s = float(rate_bps), float(delay_s)
        self.bytes_up = self.bytes_down = 0  # delivered to the upstream / back to clients
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None

    @classmethod
    def from_spec(cls, spec: LinkSpec, upstream: tuple[str, int], **kw) -> EmulatedLink:
        return cls(spec.rate_bps, spec.delay_s, upstream, spec.name, **kw)

    @property
    def address(self) -> tuple[str, int]:
        if self.port is None:
            raise RuntimeError(f"link {self.name} is not started")
        return "127.0.0.1", self.port

    def set(self, rate_bps: float | None = None, delay_s: float | None = None) -> None:
        """Change the rate and/or delay for bytes read from now on."""
        LinkSpec(self.name, rate_bps or self.rate_bps, self.delay_s if delay_s is None else delay_s)
        self.rate_bps = float(rate_bps or self.rate_bps)
        self.delay_s = self.delay_s if delay_s is None else float(delay_s)

    def start(self) -> tuple[str, int]:
        if self._thread is not None:
            raise RuntimeError(f"link {self.name} already started")
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        def main():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=main, name=f"link-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"link {self.name}: proxy did not start within 10 s")
        logger.info("link %s: 127.0.0.1:%d -> %s:%d at %.0f bit/s, %.1f ms one way", self.name, self.port,
                    *self.upstream, self.rate_bps, self.delay_s * 1e3)
        return self.address

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        loop = self._loop

        async def shutdown():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._thread = self._loop = None

    def __enter__(self) -> EmulatedLink:  # noqa: PYI034  (3.10 has no typing.Self)
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _handle(self, client_r, client_w) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError as err:
            logger.warning("link %s: upstream %s:%d refused: %s", self.name, *self.upstream, err)
            client_w.close()
            return
        for w in (client_w, up_w):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up, down = _Direction(self, client_r, up_w, "bytes_up"), _Direction(self, up_r, client_w, "bytes_down")
        try:
            await asyncio.gather(up.read_loop(), up.write_loop(), down.read_loop(), down.write_loop(),
                                 return_exceptions=True)
        except asyncio.CancelledError:  # stop(): close both sides
            for w in (client_w, up_w):
                w.close()


# --- accuracy check: a timed transfer and an echo through the link ----------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class _TestServer:
    """127.0.0.1 server: b"E" + u32 n + n bytes -> echoed; b"U" + u64 n + n bytes -> b"K"; b"D" + u64 n -> n bytes."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        threading.Thread(target=self._accept, daemon=True, name="link-check-server").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                while True:
                    op = conn.recv(1)
                    if op == b"E":
                        (n,) = struct.unpack("<I", _recv_exact(conn, 4))
                        conn.sendall(_recv_exact(conn, n))
                    elif op == b"U":
                        (n,) = struct.unpack("<Q", _recv_exact(conn, 8))
                        _recv_exact(conn, n)
                        conn.sendall(b"K")
                    elif op == b"D":
                        (n,) = struct.unpack("<Q", _recv_exact(conn, 8))
                        conn.sendall(bytes(n))
                    else:
                        return
            except (ConnectionError, OSError):
                return

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class LinkCheck:
    """Measured vs expected seconds for an echo (RTT), an upload and a download of `nbytes` through a link."""

    name: str
    nbytes: int
    rtt_s: tuple[float, float]       # (measured median, expected)
    upload_s: tuple[float, float]
    download_s: tuple[float, float]

    @staticmethod
    def error(pair: tuple[float, float]) -> float:
        """measured / expected - 1."""
        return pair[0] / pair[1] - 1.0


def check_link(spec: LinkSpec, transfer_s: float = 2.0, pings: int = 20, echo_bytes: int = 64) -> LinkCheck:
    """Time `pings` echoes and one upload and one download sized for `transfer_s` seconds at the rate."""
    import statistics

    nbytes = int(spec.rate_bps / 8 * transfer_s)
    server = _TestServer()
    try:
        with EmulatedLink.from_spec(spec, server.address) as link, \
                socket.create_connection(link.address, timeout=transfer_s * 3 + 10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def serial(n: int) -> float:
                return 8 * n / spec.rate_bps

            rtts = []
            for _ in range(pings):
                t0 = time.perf_counter()
                sock.sendall(b"E" + struct.pack("<I", echo_bytes) + bytes(echo_bytes))
                _recv_exact(sock, echo_bytes)
                rtts.append(time.perf_counter() - t0)
            rtt = (statistics.median(rtts), 2 * spec.delay_s + serial(5 + echo_bytes) + serial(echo_bytes))
            t0 = time.perf_counter()
            sock.sendall(b"U" + struct.pack("<Q", nbytes) + bytes(nbytes))
            _recv_exact(sock, 1)
            up = (time.perf_counter() - t0, 2 * spec.delay_s + serial(9 + nbytes) + serial(1))
            t0 = time.perf_counter()
            sock.sendall(b"D" + struct.pack("<Q", nbytes))
            _recv_exact(sock, nbytes)
            down = (time.perf_counter() - t0, 2 * spec.delay_s + serial(9) + serial(nbytes))
    finally:
        server.close()
    return LinkCheck(spec.name, nbytes, rtt, up, down)
