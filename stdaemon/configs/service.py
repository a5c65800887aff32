"""Named training configurations (S18): :class:`ConfigService` (``app.configs``).

SimpleTuner's WebUI keeps each training configuration as a directory with ``config.json`` and
``multidatabackend.json``; stdaemon keeps the same layout under ``<state>/configs/<name>/``
(:mod:`stdaemon.configs.store`), read and written in a small thread pool off the reactor.
"""

from __future__ import annotations

from typing import Any, Optional

from stdaemon.configs import store
from stdaemon.threads import BlockingPool


class ConfigService:
    """``app.configs``: named configs on disk, read and written off the reactor."""

    def __init__(self, root: str, pool: BlockingPool):
        self.store = store.ConfigStore(root)
        self.pool = pool

    async def list(self) -> list[dict]:
        return await self.pool.run(self.store.list)

    async def get(self, name: str) -> Optional[dict]:
        """The stored config or None; raises ValueError for a bad name and
        :class:`stdaemon.configs.store.ConfigError` for an unreadable file."""
        store.check_name(name)
        return await self.pool.run(self.store.get, name)

    async def put(self, name: str, config: dict, dataloader: Any) -> bool:
        store.check_name(name)
        return await self.pool.run(self.store.put, name, config, dataloader)

    async def delete(self, name: str) -> bool:
        store.check_name(name)
        return await self.pool.run(self.store.delete, name)
