"""One compute thread for every loaded model.

Two models stepping on two threads would run two kernel thread pools on the same cores, and
they fight (two OpenMP pools measured ~1.8x slower than one). So every Engine in the process
hands its turns to one shared thread: each turn drains that engine's inbox and runs one step,
engines take turns round-robin, and the thread sleeps when none has work.

If the thread dies (a bug that escapes an engine's own containment), every engine hears of it
at once, so no stream and no caller waits on a thread that is gone. With no engine left it
ends, so the process keeps no idle kernel thread pool of its own beside the caller's (two
live OpenMP pools made a caller's own kernels ~1.8x slower); the next engine starts a new one.
"""

from __future__ import annotations

import threading
from typing import ClassVar, Protocol


class Steppable(Protocol):
    def _turn(self) -> bool:
        """Take requests and aborts, run at most one step; True while work remains."""
        ...

    def _compute_died(self, reason: str) -> None:
        """The compute thread is gone: end every open request with an error."""
        ...


class ComputeThread:
    _shared: ClassVar[ComputeThread | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str = "llmapp-compute") -> None:
        self.name = name
        self._engines: list[Steppable] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why the thread stopped, once it has

    @classmethod
    def shared(cls) -> ComputeThread:
        """The process-wide compute thread (a new one if the last one died)."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared.error is not None:
                cls._shared = cls()
            return cls._shared

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def is_alive(self) -> bool:
        return self.error is None

    def attach(self, engine: Steppable) -> None:
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the compute thread has stopped: {self.error}")
            self._engines.append(engine)
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                self._thread.start()
        self.wake()

    def detach(self, engine: Steppable) -> None:
        with self._lock:
            if engine in self._engines:
                self._engines.remove(engine)
        self.wake()  # with none left, the thread notices and ends

    def wake(self) -> None:
        self._wake.set()

    def _main(self) -> None:
        try:
            while True:
                # Cleared before looking for work: a wake that lands during the turns
                # makes the wait below return at once instead of being lost.
                self._wake.clear()
                with self._lock:
                    engines = list(self._engines)
                    if not engines:
                        self._thread = None  # the next attach starts a new thread
                        return
                busy = False
                for engine in engines:
                    busy = engine._turn() or busy
                if not busy:
                    self._wake.wait(0.5)
        except BaseException as exc:  # noqa: BLE001 - reported to every engine below
            self.error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                engines, self._engines = self._engines, []
            for engine in engines:
                engine._compute_died(self.error)
