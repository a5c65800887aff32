"""``GET /api/admin/secrets``: which secret stores are configured and reachable (S14).

Admin only.  Reports states, locations and where the provider token comes
from -- never a value.  Stale stores are refreshed first (bounded wait).
"""

from __future__ import annotations

from klein import Klein

from stdaemon.http.surface import ADMIN, Surface, route


class AdminSecretsSurface(Surface):
    app = Klein()
    prefixes = ("/api/admin/secrets",)

    @route(app, "/api/admin/secrets", access=ADMIN)
    async def status(self, request):
        manager = self.ctx.secrets
        await manager.health()
        return manager.status()
