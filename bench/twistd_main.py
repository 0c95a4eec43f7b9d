"""``twistd`` as a script file, so that ``python -m cProfile -o FILE
bench/twistd_main.py -n relayagent ...`` profiles the whole daemon, start-up
(where the queue manager activates the queue) included; twistd's own
``--profile`` covers only ``reactor.run``."""

import sys

from twisted.application import app
from twisted.scripts.twistd import run


def _exit_normally(signal_number: int) -> None:
    # twistd ends a run stopped by SIGTERM by killing itself with it again,
    # which would end the process before cProfile writes its file.
    sys.exit(128 + signal_number)


if __name__ == "__main__":
    app._exitWithSignal = _exit_normally
    run()
