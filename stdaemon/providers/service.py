"""Provider runtime: effective settings, the outbound client factory, breakers.

``build_app`` builds one :class:`ProviderManager` and puts on the App:

* ``app.providers`` — this manager (settings, ``replicate`` client, health);
* ``app.http_clients`` — its :class:`~stdaemon.outbound.http.HTTPClientFactory` (``http``);
* ``app.breakers`` — its per-provider circuit breakers
  (:class:`~stdaemon.outbound.breaker.BreakerRegistry`; metrics read
  ``snapshot()`` of each).

Settings saved through the API live in the ``settings`` table (namespace
``provider:<name>``, one row per field) and are cached here; the outbound
factory asks for them on every call, so a change applies to the next call.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime

from stdaemon.outbound.http import HTTPClientFactory
from stdaemon.outbound.settings import OutboundSettings, outbound_settings
from stdaemon.outbound.tls import CABundleError, load_ca_bundle
from stdaemon.providers.replicate import (
    ProviderAPIError, ProviderNotConfigured, ProviderUnavailable, ReplicateClient,
)
from stdaemon.jobs import costs
from stdaemon.providers import model_versions as mv
from stdaemon.providers import settings as ps
from stdaemon.outbound.breaker import BreakerRegistry, BreakerSettings, CircuitBreaker, CircuitOpenError
from stdaemon.audit.service import AuditLog
from stdaemon.config.schema import Config
from stdaemon.health.service import DEGRADED, HEALTHY, Component
from stdaemon.logs import get_logger
from stdaemon.secrets.service import SecretsManager
from stdaemon.store import settings as settings_store
from stdaemon.store.database import Database
from stdaemon.invalid import InvalidValue

log = get_logger("stdaemon.providers")

TOKEN_NAMES = {"replicate": "REPLICATE_API_TOKEN"}
BREAKER_FIELDS = ("breaker_failure_threshold", "breaker_recovery_timeout",
                  "breaker_half_open_max_calls", "breaker_success_threshold")


class ProviderManager(Service):
    name = "providers"

    def __init__(self, config: Config, reactor: Any, clock: IReactorTime, db: Database,
                 secrets: SecretsManager, audit: AuditLog):
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self.db = db
        self.secrets = secrets
        self.audit = audit
        #: Called with the provider's name when its API token was replaced or removed
        #: (the webhooks surface forgets the signing secret learnt with the old token).
        self.token_changed_hooks: list[Callable[[str], None]] = []
        self._api: dict[str, dict[str, Any]] = {p: {} for p in ps.PROVIDERS}
        self._effective: dict[str, dict[str, tuple[Any, str]]] = {}
        # File values validated once (INI gives strings; bad values are
        # reported and ignored rather than breaking every provider call).
        self._file: dict[str, dict[str, Any]] = {}
        for provider in ps.PROVIDERS:
            values, errors = ps.normalise_file_values(config.providers.get(provider, {}) or {})
            for error in errors:
                log.error("Ignoring providers.{provider}.{field}: {reason}", provider=provider,
                          field=error.field, reason=error.reason)
            self._file[provider] = values
        self.breakers = BreakerRegistry(clock, on_change=self._breaker_changed)
        self.http = HTTPClientFactory(reactor, self.outbound)
        self.replicate = ReplicateClient(
            self.http, self.breaker("replicate"), clock,
            token=lambda: self.token("replicate"),
            api_base_url=lambda: self.value("replicate", "api_base_url"))
        # Newest version per Replicate model, on the injected clock (TTL read per call).
        self.versions = mv.VersionCache(0.0)

    # -- lifecycle -------------------------------------------------------------
    async def load(self) -> None:
        """Read settings saved through the API (start-up, after restore)."""
        for provider in ps.PROVIDERS:
            raw = await self.db.run_read(settings_store.read_namespace, f"provider:{provider}")
            values = {}
            for key, value in raw.items():
                try:
                    values[key] = ps.validate_field(key, value)
                except InvalidValue as exc:
                    log.warning("Ignoring saved provider setting {provider}.{field}: {reason}",
                                provider=provider, field=key, reason=exc.reason)
            self._set_api(provider, values)
            self.breaker(provider)

    def stopService(self):
        super().stopService()
        self.breakers.stop()
        return self.http.close()

    # -- settings -------------------------------------------------------------
    def file_values(self, provider: str) -> Mapping[str, Any]:
        return self._file.get(provider, {})

    def _resolved(self, provider: str) -> dict[str, tuple[Any, str]]:
        """The effective settings, worked out once per change of the saved ones (file values and
        the environment snapshot never change while the daemon runs). Shared: callers get copies."""
        result = self._effective.get(provider)
        if result is None:
            result = ps.effective(self.file_values(provider), self.config.environ, self._api[provider])
            if result["s3_public_url"][0] == "" and self.config.server.public_url:
                source = self.config.sources.get("server.public_url", "file")
                result["s3_public_url"] = (self.config.server.public_url.rstrip("/"), source)
            self._effective[provider] = result
        return result

    def _set_api(self, provider: str, values: dict[str, Any]) -> None:
        self._api[provider] = values
        self._effective.pop(provider, None)

    def effective(self, provider: str) -> dict[str, tuple[Any, str]]:
        return {name: (_copy(value), source) for name, (value, source) in self._resolved(provider).items()}

    def values(self, provider: str) -> dict[str, Any]:
        return {name: _copy(value) for name, (value, _source) in self._resolved(provider).items()}

    def value(self, provider: str, field: str) -> Any:
        return _copy(self._resolved(provider)[field][0])

    def outbound(self, provider: str) -> OutboundSettings:
        """Outbound settings for the HTTP factory (env-sourced values are re-read
        by ``outbound_settings`` so HTTPS_PROXY and HTTP_PROXY stay distinct)."""
        chosen = {name: value for name, (value, source) in self.effective(provider).items()
                  if source in ("file", "api")}
        return outbound_settings(chosen, self.config.environ)

    def breaker_settings(self, provider: str) -> BreakerSettings:
        values = self.values(provider)
        try:
            return BreakerSettings(
                failure_threshold=int(values["breaker_failure_threshold"]),
                recovery_timeout=float(values["breaker_recovery_timeout"]),
                half_open_max_calls=int(values["breaker_half_open_max_calls"]),
                success_threshold=int(values["breaker_success_threshold"]))
        except ValueError as exc:
            log.warning("Invalid breaker settings for {provider} ({reason}); using defaults",
                        provider=provider, reason=str(exc))
            return BreakerSettings()

    def breaker(self, provider: str) -> CircuitBreaker:
        breaker = self.breakers.get(provider)
        settings = self.breaker_settings(provider)
        if breaker.settings != settings:
            breaker.reconfigure(settings)
        return breaker

    def token(self, provider: str):
        return self.secrets.get(TOKEN_NAMES[provider])

    def token_changed(self, provider: str) -> None:
        """The API token was replaced or removed: forget what was learnt with the old one."""
        self.versions.clear()
        for hook in self.token_changed_hooks:
            hook(provider)

    def token_known(self, provider: str) -> bool:
        return bool(self.secrets.known(TOKEN_NAMES[provider]))

    def model_version(self, provider: str, profile: str) -> str | None:
        """The version configuration sets for ``profile`` (``version_override``,
        then ``model_versions``), or None: the model's newest version is used."""
        values = self.values(provider)
        return mv.configured_version(profile, values["version_override"], values["model_versions"])

    def model_id(self, provider: str, profile: str) -> str:
        return mv.model_for(profile, self.value(provider, "models"))

    async def resolve_version(self, provider: str, profile: str) -> tuple[str, str]:
        """``(version, source)`` a submission on ``profile`` runs: the configured
        version (source ``config``) or the newest version of the profile's model
        from Replicate (``replicate``; cached ``model_version_ttl`` seconds).
        Raises the client's errors (ProviderAPIError, ProviderUnavailable,
        CircuitOpenError, ProviderNotConfigured)."""
        configured = self.model_version(provider, profile)
        if configured:
            return configured, "config"
        model_id = self.model_id(provider, profile)
        return (await self.newest_version(provider, model_id)).full_version, "replicate"

    async def newest_version(self, provider: str, model_id: str) -> mv.ModelVersion:
        self.versions.ttl = float(self.value(provider, "model_version_ttl"))
        now = self.clock.seconds()
        cached = self.versions.get(model_id, now)
        if cached is not None:
            return cached
        owner, name = mv.parse_model_id(model_id)
        model = await self.replicate.get_model(owner, name)
        newest = mv.latest_from_model(model_id, model)
        if newest is None:  # no latest_version in the model: ask for the list
            listed = mv.parse_versions(model_id, await self.replicate.list_versions(owner, name))
            newest = listed[0] if listed else None
        if newest is None:
            raise ProviderAPIError(404, f"Replicate model {model_id} has no versions")
        self.versions.put(model_id, newest, self.clock.seconds())
        log.info("Replicate model {model_id}: newest version {version}", model_id=model_id,
                 version=newest.id)
        return newest

    async def list_model_versions(self, provider: str, model_id: str) -> list[mv.ModelVersion]:
        owner, name = mv.parse_model_id(model_id)
        listed = mv.parse_versions(model_id, await self.replicate.list_versions(owner, name))
        if listed:
            self.versions.ttl = float(self.value(provider, "model_version_ttl"))
            self.versions.put(model_id, listed[0], self.clock.seconds())
        return listed

    async def is_configured(self, provider: str) -> bool:
        """The provider's API token is available (env or a secrets store)."""
        if self.token_known(provider):
            return True
        return bool(await defer.maybeDeferred(self.token, provider))

    def describe(self, provider: str, configured: bool | None = None) -> dict:
        effective = self.effective(provider)
        config = {name: ps.redact(name, value) for name, (value, _s) in effective.items()}
        prices = effective["gpu_prices"][0]
        config["hardware_info"] = {
            name: {
                "name": f"{hw.gpu_count}x {hw.gpu.upper()}",
                "gpu": hw.gpu,
                "gpu_count": hw.gpu_count,
                "cost_per_second": round(costs.price_per_gpu_second(name, prices) * hw.gpu_count, 8),
                "model": mv.model_for(name, effective["models"][0]),
                "version_configured": bool(self.model_version(provider, name)),
            }
            for name, hw in costs.HARDWARE_PROFILES.items()
        }
        return {
            "provider": provider,
            "configured": self.token_known(provider) if configured is None else configured,
            "token_source": self.secrets.source(TOKEN_NAMES[provider]),
            "config": config,
            "sources": {name: source for name, (_v, source) in effective.items()},
            "circuit_breaker": self.breaker(provider).snapshot(),
        }

    async def update(self, provider: str, body: Mapping[str, Any], *, actor: str,
                     ip: str | None) -> dict:
        """Validate, persist, apply and audit a partial update (raises InvalidValue)."""
        changes = ps.validate_update(body)
        bundle = changes.get("ssl_ca_bundle")
        if bundle:
            try:
                await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                load_ca_bundle, bundle)
            except CABundleError as exc:
                raise InvalidValue("ssl_ca_bundle", str(exc)) from None
        merged = dict(self._api[provider])
        merged.update({k: v for k, v in changes.items() if v is not None})
        for key in [k for k, v in changes.items() if v is None]:
            merged.pop(key, None)
        check = {k: v for k, v in ps.effective(self.file_values(provider), self.config.environ,
                                               merged).items()}
        if check["breaker_success_threshold"][0] > check["breaker_half_open_max_calls"][0]:
            raise InvalidValue("breaker_success_threshold", "must not exceed breaker_half_open_max_calls")
        before = self.effective(provider)
        await self.db.run_write(settings_store.write_changes, f"provider:{provider}", changes, self.clock.seconds())
        self._set_api(provider, merged)
        self.versions.clear()  # a provider change (token, models, base URL) re-resolves versions
        after = self.effective(provider)
        self.breaker(provider)
        diff_old = {k: ps.redact(k, before[k][0]) for k in changes}
        diff_new = {k: ps.redact(k, after[k][0]) for k in changes}
        if after["ssl_verify"][0] is False and before["ssl_verify"][0] is not False:
            log.warning("TLS verification disabled for provider {provider} by {actor}",
                        provider=provider, actor=actor)
        log.info("Provider {provider} configured by {actor}: {fields}", provider=provider,
                 actor=actor, fields=", ".join(sorted(changes)))
        await self.audit.record_soon("provider.configured", actor=actor, ip=ip, target=provider,
                                     action="update", details={"old": diff_old, "new": diff_new})
        return self.describe(provider, await self.is_configured(provider))

    # -- health -----------------------------------------------------------------
    def _breaker_changed(self, breaker: CircuitBreaker, old: str, new: str) -> None:
        log.warning("Circuit breaker for {provider}: {old} -> {new}", provider=breaker.name,
                    old=old, new=new, last_failure=breaker.last_failure)

    async def breaker_health(self, provider: str):
        snap = self.breaker(provider).snapshot()
        name = f"circuit_breaker:{provider}"
        if snap["state"] == "closed":
            return Component(name, HEALTHY, "closed", 0.0)
        if snap["state"] == "half_open":
            return Component(name, DEGRADED, "half-open: trial calls in progress", 0.0)
        return Component(name, DEGRADED,
                         f"open after repeated failures ({snap['last_failure'] or 'provider errors'}); "
                         f"half-opens in {snap['retry_after']:.0f} s", 0.0)

    async def provider_health(self, provider: str):
        name = f"provider:{provider}"
        started = self.clock.seconds()
        try:
            account = await self.replicate.account()
        except ProviderNotConfigured as exc:
            return Component(name, DEGRADED, str(exc))
        except CircuitOpenError as exc:
            return Component(name, DEGRADED, str(exc))
        except ProviderAPIError as exc:
            # Degraded, not unhealthy: webhooks, storage and the API still work.
            return Component(name, DEGRADED, f"Replicate answered {exc.status}: {exc.message}")
        except ProviderUnavailable as exc:
            return Component(name, DEGRADED, str(exc))
        latency = round((self.clock.seconds() - started) * 1000, 3)
        who = account.get("username") or account.get("name") or "unknown account"
        return Component(name, HEALTHY, f"Replicate API reachable (account {who})", latency)


def _copy(value: Any) -> Any:
    """A list or dict setting as a fresh copy (a caller may change it); other values are immutable."""
    return type(value)(value) if isinstance(value, (list, dict)) else value
