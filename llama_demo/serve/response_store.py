"""Stored answers of /v1/responses (`store`, on by default as OpenAI's is): what GET returns and
what `previous_response_id` continues. In rank 0's memory only, bounded in count and bytes
(config.RESPONSE_STORE_MAX / _BYTES), the oldest dropped first; a restart forgets them all.
Dropped ids are remembered (ids only) so a client learns its response expired, not that it
never existed."""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

from ..config import RESPONSE_STORE_BYTES, RESPONSE_STORE_MAX
from ..text.chat_format import Message
from .errors import ApiError


@dataclass
class Stored:
    response: dict  # the Response object, as GET /v1/responses/{id} returns it
    dialog: list[Message]  # its input and output as a dialog, without its instructions (OpenAI drops them)
    size: int  # bytes it is counted as


class ResponseStore:
    def __init__(self, max_count: int = RESPONSE_STORE_MAX, max_bytes: int = RESPONSE_STORE_BYTES):
        self.max_count, self.max_bytes = max_count, max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._expired: OrderedDict[str, None] = OrderedDict()
        self.bytes = 0

    def put(self, response: dict, dialog: list[Message]) -> None:
        size = len(json.dumps(response)) + sum(len(m.content) + len(json.dumps(m.tool_calls or [])) for m in dialog)
        if size > self.max_bytes:
            self._forget(response["id"])  # bigger than the whole store: not kept, and GET says so
            return
        self._items[response["id"]] = Stored(response, dialog, size)
        self.bytes += size
        while len(self._items) > self.max_count or self.bytes > self.max_bytes:
            rid, old = self._items.popitem(last=False)
            self.bytes -= old.size
            self._forget(rid)

    def _forget(self, rid: str) -> None:
        self._expired[rid] = None
        while len(self._expired) > 10 * self.max_count:
            self._expired.popitem(last=False)

    def get(self, rid: str, field: str | None = None) -> Stored:
        """The stored response; a 400 naming `field` (a request's previous_response_id) or, for a
        path's id, a 404 when it is unknown or has expired."""
        if rid in self._items:
            return self._items[rid]
        if rid in self._expired:
            why = (f"response {rid!r} has expired: this server keeps the last {self.max_count} responses "
                   f"({self.max_bytes // 2**20} MiB) in memory; send the whole conversation as input instead")
        else:
            why = f"no stored response {rid!r} (never stored, deleted, or kept by a server since restarted)"
        if field:
            raise ApiError(400, f"{field}: {why}", param=field)
        raise ApiError(404, why, type="not_found_error", code="not_found")

    def delete(self, rid: str) -> None:
        self.get(rid)
        old = self._items.pop(rid)
        self.bytes -= old.size
