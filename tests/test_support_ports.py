"""
The ports the interop tests give their servers (tests/support/ports.py):
below the kernel's ephemeral range, in turn, never one that is held.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile

from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SynchronousTestCase

from tests.support import ports


def _range_file(text: str) -> str:
    handle, path = tempfile.mkstemp()
    with os.fdopen(handle, "w") as out:
        out.write(text)
    return path


class BelowEphemeralPortsTests(SynchronousTestCase):
    def test_the_range_ends_where_the_ephemeral_range_begins(self) -> None:
        path = _range_file("32768\t60999\n")
        self.addCleanup(os.remove, path)
        self.assertEqual(ports.below_ephemeral_ports(path), range(10000, 32768))

    def test_no_range_where_the_ephemeral_range_starts_low(self) -> None:
        path = _range_file("1024 65535\n")
        self.addCleanup(os.remove, path)
        self.assertIsNone(ports.below_ephemeral_ports(path))

    def test_no_range_where_it_cannot_be_read(self) -> None:
        self.assertIsNone(ports.below_ephemeral_ports("/nonexistent/ip_local_port_range"))
        path = _range_file("garbage")
        self.addCleanup(os.remove, path)
        self.assertIsNone(ports.below_ephemeral_ports(path))


class FreePortTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.turns = ports.PortTurns(range(20000, 20010), start=3)
        self.patch(ports, "TURNS", self.turns)

    def hold(self, port: int, host: str = "127.0.0.1") -> socket.socket:
        held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(held.close)
        try:
            held.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                self.skipTest(f"port {port} is in use on this machine")
            raise
        return held

    def test_ports_are_handed_out_in_turn(self) -> None:
        self.assertEqual([ports.free_port() for _ in range(3)], [20003, 20004, 20005])

    def test_a_held_port_is_skipped(self) -> None:
        self.hold(20003)
        self.assertEqual(ports.free_port(), 20004)

    def test_a_port_held_on_one_of_several_hosts_is_skipped(self) -> None:
        self.hold(20003, "127.0.0.3")
        self.assertEqual(ports.free_port_on("127.0.0.2", "127.0.0.3"), 20004)
        # The probes are gone: the port can be bound on both at once.
        self.hold(20004, "127.0.0.2")
        self.hold(20004, "127.0.0.3")

    def test_the_turn_goes_round_the_range(self) -> None:
        handed = [ports.free_port() for _ in range(12)]
        self.assertEqual(handed[:7], list(range(20003, 20010)))
        self.assertEqual(handed[7:], [20000, 20001, 20002, 20003, 20004])

    def test_no_port_free_is_eaddrinuse(self) -> None:
        self.patch(ports, "TURNS", ports.PortTurns(range(20000, 20002), start=0))
        self.hold(20000)
        self.hold(20001)
        with self.assertRaises(OSError) as caught:
            ports.free_port()
        self.assertEqual(caught.exception.errno, errno.EADDRINUSE)

    def test_without_a_range_the_kernel_chooses(self) -> None:
        self.patch(ports, "TURNS", ports.PortTurns(None))
        port = ports.free_port_on("127.0.0.2", "127.0.0.3")
        self.assertGreater(port, 0)

    def test_bind_free_binds_the_socket_itself(self) -> None:
        self.hold(20003)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        self.assertEqual(ports.bind_free(listener, "127.0.0.1"), 20004)
        self.assertEqual(listener.getsockname(), ("127.0.0.1", 20004))

    def test_the_default_turns_stay_below_the_ephemeral_range(self) -> None:
        real = ports.below_ephemeral_ports()
        if real is None:
            self.skipTest("this kernel's ephemeral range is unknown or starts low")
        self.patch(ports, "TURNS", ports.PortTurns(real))
        for _ in range(20):
            self.assertIn(ports.free_port(), real)


class AddressInUseTests(SynchronousTestCase):
    def test_eaddrinuse_from_a_socket_or_from_listen_tcp(self) -> None:
        in_use = OSError(errno.EADDRINUSE, "Address already in use")
        self.assertTrue(ports.address_in_use(in_use))
        self.assertTrue(ports.address_in_use(CannotListenError("127.0.0.1", 25, in_use)))
        self.assertFalse(ports.address_in_use(OSError(errno.EACCES, "Permission denied")))
        self.assertFalse(ports.address_in_use(ValueError("no")))
