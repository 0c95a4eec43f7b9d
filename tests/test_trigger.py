"""Tests for relayagent.spool.trigger: the trigger socket's client writes
and reads AMP's boxes itself, byte for byte as Twisted's AMP does, and
copes with daemons that answer badly.  (The exchange with the daemon's
real listener is in tests.test_control.)"""

from __future__ import annotations

import os
import socket
import threading

from twisted.protocols import amp
from twisted.trial.unittest import TestCase

from relayagent.spool import control, trigger


class WireFormatTests(TestCase):
    def test_each_question_is_the_box_twisted_writes(self) -> None:
        for command in (control.Wakeup, control.Flush, control.Reload, control.Logrotate):
            expected = amp.AmpBox(_command=command.commandName, _ask=b"1").serialize()
            self.assertEqual(trigger.question(command.commandName), expected, command)

    def test_the_names_are_the_daemons(self) -> None:
        self.assertEqual({name: command.commandName for name, command in control.COMMANDS.items()},
                         trigger.TRIGGERS)
        self.assertEqual({name: command.commandName for name, command in control.ANSWERED.items()},
                         trigger.QUESTIONS)

    def test_parse_reads_twisted_boxes(self) -> None:
        box = amp.AmpBox(_answer=b"1", ok=b"True", text="réponse".encode(), empty=b"")
        self.assertEqual(trigger.parse_box(box.serialize() + b"next box"), dict(box))

    def test_a_box_cut_anywhere_is_not_yet_a_box(self) -> None:
        wire = amp.AmpBox(_answer=b"1", text=b"x" * 300).serialize()
        for end in range(len(wire)):
            self.assertIsNone(trigger.parse_box(wire[:end]), end)
        self.assertIsNotNone(trigger.parse_box(wire))

    def test_encode_refuses_what_amp_cannot_carry(self) -> None:
        self.assertRaises(ValueError, trigger.encode_box, {b"k" * 256: b""})
        self.assertRaises(ValueError, trigger.encode_box, {b"": b"v"})
        self.assertRaises(ValueError, trigger.encode_box, {b"k": b"v" * 65536})
        self.assertEqual(trigger.parse_box(trigger.encode_box({b"k": b"v" * 65535})), {b"k": b"v" * 65535})


class BadDaemonTests(TestCase):
    """A socket that answers with something else than an answer."""

    def serve(self, reply: bytes) -> str:
        directory = os.path.relpath(self.mktemp())
        os.makedirs(os.path.join(directory, trigger.PUBLIC))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(trigger.socket_path(directory))
        listener.listen(1)
        self.addCleanup(listener.close)

        def answer_once() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.recv(4096)
                peer.sendall(reply)

        thread = threading.Thread(target=answer_once, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        return directory

    def test_an_error_is_no_answer(self) -> None:
        error = amp.AmpBox(_error=b"1", _error_code=b"UNHANDLED", _error_description=b"no").serialize()
        self.assertFalse(trigger.trigger(self.serve(error), "wakeup"))

    def test_a_close_before_the_answer_is_no_answer(self) -> None:
        self.assertFalse(trigger.trigger(self.serve(b"\x00\x07_answ"), "flush"))
        self.assertIsNone(trigger.ask(self.serve(b""), "reload"))

    def test_an_endless_answer_is_cut_off(self) -> None:
        # One key after another, never the empty key that ends the box.
        endless = trigger.encode_box({b"k%d" % n: b"v" * 60000 for n in range(3)})[:-2]
        self.assertFalse(trigger.trigger(self.serve(endless), "wakeup", timeout=5))

    def test_ask_reads_ok_and_text(self) -> None:
        reply = amp.AmpBox(_answer=b"1", ok=b"False", text="refusé".encode()).serialize()
        self.assertEqual(trigger.ask(self.serve(reply), "logrotate"), (False, "refusé"))
