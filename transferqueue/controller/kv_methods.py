"""The controller's key-value calls (``kv_*``: each key names one row of a partition; see
:mod:`transferqueue.kv`). Mixed into :class:`~transferqueue.controller.actor.ControllerActor`;
the key index itself is pure (:mod:`.state`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from transferqueue.controller.state import ControllerState

T = TypeVar("T")

__all__ = ["KvMethods"]


class KvMethods:
    """Remote methods of the key-value API (see the module docstring)."""

    if TYPE_CHECKING:
        _state: ControllerState

        async def _until(
            self, pid: str, ready: Callable[[], T | None], timeout: float | None, late: str
        ) -> T: ...

        async def clear_samples(self, pid: str, rows: Sequence[int]) -> None: ...

    async def kv_rows(self, pid: str, keys: Sequence[str]) -> list[int]:
        return self._state.rows_for_keys(pid, keys)

    async def kv_list(
        self,
        pid: str | None = None,
        where: Mapping[str, Any] | None = None,
        min_count: int | None = None,
        timeout: float | None = None,
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """``{partition: {key: tags}}`` (``where``: keys whose tags match). With
        ``min_count``, waits -- woken by puts and tag changes, never polling -- until at
        least that many keys of ``pid`` match; ``TimeoutError`` after ``timeout``."""
        if min_count is None:
            return self._state.kv_list(pid, where)
        if pid is None:
            raise ValueError("kv_list with min_count waits on one partition: give partition_id")

        def enough() -> dict[str, dict[str, dict[str, Any]]] | None:
            found = self._state.kv_list(pid, where)
            return found if len(found.get(pid, {})) >= min_count else None

        return await self._until(
            pid, enough, timeout,
            f"fewer than {min_count} keys of partition {pid!r} matched within {timeout} s",
        )  # fmt: skip

    async def kv_clear(self, pid: str, keys: Sequence[str]) -> list[int]:
        """Forget ``keys`` (keys already gone are ignored, as Redis ``DEL``); returns the
        rows dropped."""
        rows = self._state.rows_of_present_keys(pid, keys)
        await self.clear_samples(pid, rows)
        return rows

    async def kv_fields(self, pid: str, keys: Sequence[str]) -> dict[str, Any]:
        """Rows of ``keys`` and the fields every one of them has."""
        rows = self._state.rows_for_keys(pid, keys)
        units = self._state.locate(pid, rows)
        return {"rows": rows, "fields": self._state.common_fields(pid, rows), "units": units}
