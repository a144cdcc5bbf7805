"""SIGTERM and SIGINT during training (`StopRequest`): a flag the loop checks between host calls, so that
it writes a checkpoint and stops cleanly."""

import signal
import threading


class StopRequest:
    """While entered, SIGTERM and SIGINT set `signal` instead of ending the process. Python delivers
    signals to the main thread only: entered from another thread, it says that signals will end the
    process as usual (no checkpoint), and `signal` stays None."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, say=print):
        self.signal = None
        self._say = say
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            self._say(f"warning: training runs outside the main thread ({threading.current_thread().name}), where "
                      "Python cannot catch signals: SIGTERM and SIGINT will end the process without a checkpoint")
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
