"""
Benchmark: N mail transactions over one SMTPSession against smtp-sink.

    python bench/session.py [-n 2000] [--recipients 5] [--size 4096] [--chunk 65536]

Runs twice, against smtp-sink with PIPELINING and with ``-p`` (lock-step),
and prints transactions per second and peak RSS (resource.getrusage), plus
the BodyEncoder's throughput on a large body.  Needs Postfix's smtp-sink.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor  # noqa: E402  (a script: the global reactor is fine)
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402

from relayagent.common.config import Config  # noqa: E402
from relayagent.common.envelope import Envelope, Recipient  # noqa: E402
from relayagent.smtp.body import BodyEncoder  # noqa: E402
from relayagent.smtp.channel import ServerInfo, SessionSettings  # noqa: E402
from relayagent.smtp.session import SMTPSessionFactory  # noqa: E402
from tests.support.sink import SmtpSink  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_content(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 .dots\n"
    body = b"Subject: bench\nFrom: a@example.org\n\n" + line * (size // len(line) + 1)
    return body[:size]


async def run(flags: list[str], transactions: int, recipients: int, content_path: str, chunk: int) -> float:
    sink = SmtpSink(flags, dump=False, backlog=100)
    await sink.start(reactor)
    try:
        config = Config.defaults().replace(smtp_helo_name="bench.example")
        factory = SMTPSessionFactory(
            SessionSettings.from_config(config), reactor, ServerInfo("sink", sink.host, sink.port, "sink"), chunk_size=chunk
        )
        session = await TCP4ClientEndpoint(reactor, sink.host, sink.port).connect(factory)
        await session.greeted
        envelope = Envelope(
            queue_id="BENCH",
            sender="a@example.org",
            recipients=tuple(Recipient(f"u{i}@example.com", index=i) for i in range(recipients)),
            arrival_time=time.time(),
            content_size=os.path.getsize(content_path),
            open_content=lambda: open(content_path, "rb"),  # streamed, as from a queue file
        )
        started = time.perf_counter()
        for number in range(transactions):
            result = await session.deliver(envelope, envelope.recipients, last=number == transactions - 1)
            if not all(status.ok for status in result.recipients.values()):
                raise SystemExit(f"delivery failed: {result}")
        elapsed = time.perf_counter() - started
        return transactions / elapsed
    finally:
        await sink.stop(reactor)


def encoder_throughput(size_mib: int = 64) -> float:
    chunk = make_content(65536)
    encoder = BodyEncoder(998)
    count = size_mib * 16
    started = time.perf_counter()
    for _ in range(count):
        encoder.encode(chunk)
    encoder.flush()
    return size_mib / (time.perf_counter() - started)


async def main(options: argparse.Namespace) -> None:
    if not SmtpSink.available():
        raise SystemExit(SmtpSink.missing_reason)
    with tempfile.NamedTemporaryFile(prefix="relayagent-bench-", delete=False) as spool_file:
        block = make_content(1 << 20)[40:]  # written in blocks: the bench itself stays small
        spool_file.write(make_content(min(options.size, 40)))
        left = options.size - min(options.size, 40)
        while left > 0:
            spool_file.write(block[:left])
            left -= len(block)
    print(f"encoder: {encoder_throughput():.0f} MiB/s (64 KiB chunks, 62-octet lines), peak RSS {peak_rss_mib():.1f} MiB")
    for label, flags in (("pipelining", []), ("no pipelining (-p)", ["-p"])):
        try:
            rate = await run(flags, options.n, options.recipients, spool_file.name, options.chunk)
        except BaseException:
            os.unlink(spool_file.name)
            raise
        print(
            f"{label}: {options.n} transactions x {options.recipients} rcpt x {options.size} octets: "
            f"{rate:.0f} transactions/s, peak RSS {peak_rss_mib():.1f} MiB"
        )
    os.unlink(spool_file.name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--recipients", type=int, default=5)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=65536)
    options = parser.parse_args()

    def go() -> None:
        def stop(result):  # type: ignore[no-untyped-def]
            reactor.stop()
            return result

        Deferred.fromCoroutine(main(options)).addBoth(stop).addErrback(lambda f: f.printTraceback())

    reactor.callWhenRunning(go)
    reactor.run()
