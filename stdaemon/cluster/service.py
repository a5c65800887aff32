"""The cluster capability: what several instances share through Redis (``cluster`` config).

With ``cluster.redis_url`` empty (the default) nothing here runs: ``relay`` and
``leases`` are None, events stay in process and every timer runs on this
instance, exactly as a single daemon always did.

With it set, :class:`ClusterService` keeps two connections to Redis
(:mod:`stdaemon.cluster.connection`): one for commands (PUBLISH, the lease
scripts) and one subscribed to the events channel.  It owns

- ``relay`` (:mod:`stdaemon.cluster.relay`): job events to and from the other
  instances, health component ``cluster_events``;
- ``leases`` (:mod:`stdaemon.cluster.leases`): the run-once timers' leases,
  health component ``cluster_leases``;
- ``figures()``: what the ``health`` metrics category exports about both.

On stop the leases held are released first (another instance takes over at
its next tick), then the connections close.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import TYPE_CHECKING, Any, Iterable, Optional

from twisted.application.service import Service
from twisted.internet import defer

from stdaemon.config.schema import ClusterConfig
from stdaemon.health.service import DEGRADED, HEALTHY, Component
from stdaemon.logs import get_logger

if TYPE_CHECKING:  # imported when the cluster is enabled: a single instance never loads txredisapi
    from stdaemon.cluster.connection import RedisConnection
    from stdaemon.cluster.leases import TimerLeases
    from stdaemon.cluster.relay import EventRelay

log = get_logger("stdaemon.cluster")


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"[:64]


class ClusterService(Service):
    def __init__(self, config: ClusterConfig, clock: Any, reactor: Any, event_fields: Iterable[str],
                 initial_delay: float = 0.5, max_delay: float = 10.0):
        self.config = config
        self.clock = clock
        self.enabled = bool(config.redis_url)
        self.instance_id = config.instance_id or default_instance_id()
        self.commands: Optional["RedisConnection"] = None
        self.subscriber: Optional["RedisConnection"] = None
        self.relay: Optional["EventRelay"] = None
        self.leases: Optional["TimerLeases"] = None
        if not self.enabled:
            return
        from stdaemon.cluster.connection import RedisConnection
        from stdaemon.cluster.leases import TimerLeases
        from stdaemon.cluster.relay import EventRelay, Subscriber

        options = dict(timeout=config.timeout, initial_delay=initial_delay, max_delay=max_delay)
        self.commands = RedisConnection(config.redis_url, clock, reactor, name="commands", **options)
        self.subscriber = RedisConnection(config.redis_url, clock, reactor, name="events-subscription",
                                          protocol=Subscriber, **options)
        self.relay = EventRelay(self.commands, self.subscriber, namespace=config.namespace,
                                origin=f"{self.instance_id}/{secrets.token_hex(6)}", fields=event_fields)
        self.leases = TimerLeases(self.commands, clock, namespace=config.namespace,
                                  instance_id=self.instance_id, lease_seconds=config.lease_seconds)

    def startService(self) -> None:
        super().startService()
        if not self.enabled:
            return
        log.info("Cluster instance {instance}: events and timer leases through {where}",
                 instance=self.instance_id, where=self.commands.where)
        self.commands.start()
        self.subscriber.start()
        self.leases.start()

    def stopService(self) -> Any:
        super().stopService()
        if not self.enabled:
            return None
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.leases.stop()
        await defer.gatherResults([self.commands.stop(), self.subscriber.stop()], consumeErrors=True)

    # -- wiring (called by build_app; nothing happens on a single instance) ------------------

    def relay_events(self, bus: Any) -> None:
        """``bus`` (the EventBus) hands its events to the relay and shows the other instances'."""
        if self.relay is not None:
            bus.relay = self.relay.send
            self.relay.on_event.append(bus.receive)

    def register(self, health: Any, metrics: Any) -> None:
        """Health components ``cluster_events`` and ``cluster_leases``; the metrics figures."""
        if self.enabled:
            health.register("cluster_events", self.events_health)
            health.register("cluster_leases", self.leases_health)
            metrics.register_cluster_source(self.figures)

    # -- health -------------------------------------------------------------------------

    async def events_health(self) -> Component:
        relay = self.relay
        if relay.healthy:
            return Component("cluster_events", HEALTHY,
                             f"relaying job events through {self.commands.where} as {self.instance_id} "
                             f"({relay.relayed} sent, {relay.received} received)")
        problems = []
        if not relay.subscribed:
            problems.append(f"subscription: {self.subscriber.describe()}")
        if not self.commands.connected:
            problems.append(f"publishing: {self.commands.describe()}")
        return Component("cluster_events", DEGRADED,
                         "; ".join(problems) + f"; local events still flow, {relay.pending} waiting to be relayed")

    async def leases_health(self) -> Component:
        leases = self.leases
        held = sorted(leases.held)
        skipped = sum(n for (_, reason), n in leases.skipped.items() if reason == "redis_unavailable")
        if leases.unavailable is not None and not self.commands.connected:
            return Component("cluster_leases", DEGRADED,
                             f"leased timers are skipped while Redis is unreachable ({skipped} skipped so "
                             f"far): {leases.unavailable}")
        # connected again: the next tick of each leased timer takes or renews its lease
        note = f"; {skipped} run(s) skipped while Redis was unreachable" if skipped else ""
        return Component("cluster_leases", HEALTHY,
                         f"holding {', '.join(held) if held else 'no lease'} of "
                         f"{len(leases.timers)} leased timer(s){note}")

    # -- metrics ------------------------------------------------------------------------

    def figures(self) -> dict:
        relay, leases = self.relay, self.leases
        return {
            "events_relayed": relay.relayed,
            "events_received": relay.received,
            "events_dropped": relay.dropped,
            "events_pending": relay.pending,
            "subscriptions": relay.subscriptions,
            "connected": {"commands": self.commands.connected, "subscription": relay.subscribed},
            "leases": leases.figures(),
        }
