"""The daemon in process, profiled only while it serves: ``python -m bench.profiled_daemon CONFIG OUT``.

Start-up is not profiled (it would swamp a few seconds of requests): cProfile is enabled when the
service is ready and the stats are written to OUT when SIGTERM stops it. Times are the reactor
thread's CPU time (``time.thread_time``), not wall-clock time.
"""

from __future__ import annotations

import cProfile
import os
import sys
import time


def main() -> None:
    config_path, out = sys.argv[1], sys.argv[2]
    from twisted.internet import reactor

    from stdaemon.config.loader import load_config
    from stdaemon.service import StdaemonService

    config = load_config(config_path, environ=dict(os.environ)).config
    service = StdaemonService(config, reactor)
    # CPU time of the reactor thread: on a busy machine, wall-clock time would charge whatever
    # function was running when the process was descheduled.
    profiler = cProfile.Profile(time.thread_time)

    def ready(_: object) -> None:
        profiler.enable()

    def stop() -> None:
        profiler.disable()
        profiler.dump_stats(out)
        return service.stopService()

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    service.privilegedStartService()
    service.startService()
    service.started.addCallback(ready)
    reactor.run()


if __name__ == "__main__":
    main()
