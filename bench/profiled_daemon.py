"""The daemon in process, profiled only while it serves: ``python -m bench.profiled_daemon CONFIG OUT``.

Start-up is not profiled (it would swamp a few seconds of requests): cProfile is enabled when the
service is ready and the stats are written to OUT when SIGTERM stops it.
"""

from __future__ import annotations

import cProfile
import os
import sys


def main() -> None:
    config_path, out = sys.argv[1], sys.argv[2]
    from twisted.internet import reactor

    from stdaemon.config.loader import load_config
    from stdaemon.service import StdaemonService

    config = load_config(config_path, environ=dict(os.environ)).config
    service = StdaemonService(config, reactor)
    profiler = cProfile.Profile()

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
