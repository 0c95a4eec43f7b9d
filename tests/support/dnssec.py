"""
A real DNSSEC chain on loopback for the DANE interop tests: NSD serving a
zone signed with ldns-keygen/ldns-signzone, and unbound validating it with
the zone's DS record as its only trust anchor.

    chain = DNSSECChain(directory, "dane.test", [
        "ee   IN MX 10 mx.ee",
        "mx.ee IN A 127.0.0.2",
        "_2525._tcp.mx.ee IN TLSA 3 1 1 ABCD...",
    ], tamper=["_2525._tcp.mx.bad"])
    await chain.start(reactor)
    config = ... dns_nameservers = chain.nameserver   # unbound, "127.0.0.1:PORT"
    await chain.stop(reactor)

Both servers run in the foreground (``nsd -d``, ``unbound -d``) with their
own configuration, zone, pid and state files in ``directory``: no chroot,
no privilege drop, nothing of the system's.  NSD listens on 127.0.0.1 and
a free port; unbound on another, with a ``stub-zone`` for the zone
pointing at NSD and ``do-not-query-localhost: no``.  A record whose owner
is listed in ``tamper`` has its rdata changed after signing, so that its
signature no longer verifies: unbound answers SERVFAIL for it (bogus).
``insecure=[...]`` adds a child zone ``insecure.<zone>`` with those
records, delegated without a DS record and not signed: its answers are
insecure (no AD bit), as an unsigned domain's are.

``DNSSECChain.missing_reason`` is None when nsd, unbound, ldns-keygen and
ldns-signzone are all installed, else the text for ``SkipTest``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence

from tests.support.ports import free_port
from tests.support.sink import end_process, wait_until_listening

NSD = shutil.which("nsd") or ("/usr/sbin/nsd" if os.path.exists("/usr/sbin/nsd") else None)
UNBOUND = shutil.which("unbound") or ("/usr/sbin/unbound" if os.path.exists("/usr/sbin/unbound") else None)
LDNS_KEYGEN = shutil.which("ldns-keygen")
LDNS_SIGNZONE = shutil.which("ldns-signzone")

STARTUP_TIMEOUT = 15.0


def _missing() -> str | None:
    missing = [
        name
        for name, path in (("nsd", NSD), ("unbound", UNBOUND), ("ldns-keygen", LDNS_KEYGEN),
                           ("ldns-signzone", LDNS_SIGNZONE))
        if not path
    ]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: nsd unbound ldnsutils)"
    return None


NSD_CONF = """\
server:
  ip-address: 127.0.0.1
  port: {port}
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "{dir}"
  database: ""
  pidfile: "{dir}/nsd.pid"
  xfrdfile: "{dir}/xfrd.state"
  xfrdir: "{dir}"
  zonelistfile: "{dir}/zone.list"
  logfile: "{dir}/nsd.log"
  server-count: 1
  verbosity: 1
remote-control:
  control-enable: no
zone:
  name: "{zone}"
  zonefile: "{dir}/{zone}.zone.signed"
"""

NSD_CHILD_ZONE = """\
zone:
  name: "insecure.{zone}"
  zonefile: "{dir}/insecure.{zone}.zone"
"""

UNBOUND_CONF = """\
server:
  interface: 127.0.0.1
  port: {port}
  do-ip6: no
  username: ""
  chroot: ""
  directory: "{dir}"
  pidfile: "{dir}/unbound.pid"
  use-syslog: no
  logfile: "{dir}/unbound.log"
  verbosity: 1
  val-log-level: 2
  num-threads: 1
  do-not-query-localhost: no
  module-config: "validator iterator"
  trust-anchor-file: "{dir}/{anchor}"
  local-zone: "{tld}." nodefault
  access-control: 127.0.0.0/8 allow
remote-control:
  control-enable: no
stub-zone:
  name: "{zone}"
  stub-addr: 127.0.0.1@{nsd_port}
"""

UNBOUND_CHILD_STUB = """\
stub-zone:
  name: "insecure.{zone}"
  stub-addr: 127.0.0.1@{nsd_port}
"""


class DNSSECChain:
    """NSD + unbound over one signed zone (module docstring)."""

    missing_reason = _missing()

    def __init__(
        self, directory: str, zone: str, records: Sequence[str], *, tamper: Sequence[str] = (),
        insecure: Sequence[str] = (),
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.zone = zone.rstrip(".")
        self.records = list(records)
        self.insecure = list(insecure)
        self.tamper = [f"{owner.rstrip('.')}.{self.zone}." for owner in tamper]
        self.nsd_port = 0
        self.unbound_port = 0
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def nameserver(self) -> str:
        """The validating resolver, for ``dns_nameservers``."""
        return f"127.0.0.1:{self.unbound_port}"

    def _run(self, *argv: str) -> str:
        done = subprocess.run(argv, cwd=self.directory, capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
        return done.stdout.decode().strip()

    def _sign(self) -> str:
        """Write, sign and (maybe) tamper with the zone; returns the name
        of the DS file (the trust anchor)."""
        zone_file = os.path.join(self.directory, f"{self.zone}.zone")
        with open(zone_file, "w", encoding="ascii") as handle:
            handle.write(f"$ORIGIN {self.zone}.\n$TTL 300\n")
            handle.write(f"@ IN SOA ns.{self.zone}. hostmaster.{self.zone}. 1 3600 600 86400 300\n")
            handle.write(f"@ IN NS ns.{self.zone}.\nns IN A 127.0.0.1\n")
            for line in self.records:
                handle.write(line + "\n")
            if self.insecure:
                # A delegation without DS: the child is provably unsigned.
                handle.write(f"insecure IN NS ns.{self.zone}.\n")
        if self.insecure:
            child = f"insecure.{self.zone}"
            with open(os.path.join(self.directory, f"{child}.zone"), "w", encoding="ascii") as handle:
                handle.write(f"$ORIGIN {child}.\n$TTL 300\n")
                handle.write(f"@ IN SOA ns.{self.zone}. hostmaster.{self.zone}. 1 3600 600 86400 300\n")
                handle.write(f"@ IN NS ns.{self.zone}.\n")
                for line in self.insecure:
                    handle.write(line + "\n")
        # One key as KSK and ZSK (a CSK): enough for a validator.
        key = self._run(LDNS_KEYGEN, "-a", "ECDSAP256SHA256", "-k", self.zone)
        self._run(LDNS_SIGNZONE, zone_file, key)
        if self.tamper:
            self._tamper(zone_file + ".signed")
        return f"{key}.ds"

    def _tamper(self, signed: str) -> None:
        with open(signed, encoding="ascii") as handle:
            lines = handle.readlines()
        changed = 0
        for index, line in enumerate(lines):
            fields = line.split()
            if len(fields) > 4 and fields[0].lower() in self.tamper and fields[3] not in ("RRSIG", "NSEC", "NSEC3"):
                # Flip the last hex digit of the rdata: the RRSIG stays.
                last = fields[-1]
                flipped = last[:-1] + ("0" if last[-1] != "0" else "1")
                lines[index] = "\t".join(fields[:-1] + [flipped]) + "\n"
                changed += 1
        if not changed:
            raise RuntimeError(f"nothing to tamper with for {self.tamper}")
        with open(signed, "w", encoding="ascii") as handle:
            handle.writelines(lines)

    async def start(self, reactor) -> None:  # type: ignore[no-untyped-def]
        """Sign the zone, start NSD, then unbound; each listening before
        this returns."""
        anchor = self._sign()
        self.nsd_port = free_port()
        nsd_conf = os.path.join(self.directory, "nsd.conf")
        with open(nsd_conf, "w", encoding="ascii") as handle:
            handle.write(NSD_CONF.format(port=self.nsd_port, dir=self.directory, zone=self.zone))
            if self.insecure:
                handle.write(NSD_CHILD_ZONE.format(dir=self.directory, zone=self.zone))
        await self._spawn(reactor, [NSD, "-d", "-c", nsd_conf], self.nsd_port, "nsd", "nsd.log")
        self.unbound_port = free_port()
        unbound_conf = os.path.join(self.directory, "unbound.conf")
        with open(unbound_conf, "w", encoding="ascii") as handle:
            handle.write(
                UNBOUND_CONF.format(
                    port=self.unbound_port,
                    dir=self.directory,
                    zone=self.zone,
                    tld=self.zone.rsplit(".", 1)[-1],
                    anchor=anchor,
                    nsd_port=self.nsd_port,
                )
            )
            if self.insecure:
                handle.write(UNBOUND_CHILD_STUB.format(zone=self.zone, nsd_port=self.nsd_port))
        await self._spawn(reactor, [UNBOUND, "-d", "-c", unbound_conf], self.unbound_port, "unbound", "unbound.log")

    async def _spawn(self, reactor, argv: list[str], port: int, what: str, log_name: str) -> None:  # type: ignore[no-untyped-def]
        output = open(os.path.join(self.directory, f"{what}.out"), "wb")  # noqa: SIM115 - the child keeps it
        process = subprocess.Popen(
            argv, cwd=self.directory, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        output.close()
        self.processes.append(process)

        def said() -> str:
            text = ""
            for name in (f"{what}.out", log_name):
                with contextlib.suppress(OSError), open(os.path.join(self.directory, name), errors="replace") as f:
                    text += f.read()[-2000:]
            return text

        await wait_until_listening(
            reactor, process, "127.0.0.1", port, STARTUP_TIMEOUT, what,
            exited=said, stop=self.stop, detail=said,
        )

    async def stop(self, reactor) -> None:  # type: ignore[no-untyped-def]
        """Stop unbound and NSD (their whole process groups)."""
        while self.processes:
            process = self.processes.pop()
            group = process.pid

            def signal_group(sig: int, group: int = group) -> None:
                os.killpg(group, sig)

            await end_process(
                reactor, process, 10.0,
                terminate=lambda signal_group=signal_group: signal_group(signal.SIGTERM),
                kill=lambda signal_group=signal_group: signal_group(signal.SIGKILL),
            )
