"""Which subscribers may want a topic: a tree of subscription filters by topic level.

The embedded broker routes each message to the sessions this index names instead of
scanning every session: 2,000 idle per-vehicle sessions cost a message nothing. The
index answers a superset (it ignores the ``$``-topic rule and subscription options); the
broker's exact match over the few filters of each candidate decides.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

Holder = TypeVar("Holder", bound=Hashable)


class _Node(Generic[Holder]):
    __slots__ = ("children", "holders")

    def __init__(self) -> None:
        self.children: dict[str, _Node[Holder]] = {}
        self.holders: set[Holder] = set()


class TopicIndex(Generic[Holder]):
    """Holders (sessions) by the filters they subscribe to."""

    def __init__(self) -> None:
        self._root: _Node[Holder] = _Node()

    def add(self, topic_filter: str, holder: Holder) -> None:
        """``holder`` subscribes to ``topic_filter``."""
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _Node())
        node.holders.add(holder)

    def remove(self, topic_filter: str, holder: Holder) -> None:
        """``holder`` no longer subscribes to ``topic_filter``; empty branches go."""
        path = [self._root]
        for level in topic_filter.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        path[-1].holders.discard(holder)
        for level, parent, node in zip(
            reversed(topic_filter.split("/")), reversed(path[:-1]), reversed(path[1:]), strict=True
        ):
            if node.holders or node.children:
                break
            del parent.children[level]

    def candidates(self, levels: list[str]) -> set[Holder]:
        """Every holder of a filter that matches the topic of ``levels`` (and maybe more)."""
        found: set[Holder] = set()
        nodes = [self._root]
        for level in levels:
            following: list[_Node[Holder]] = []
            for node in nodes:
                children = node.children
                if (rest := children.get("#")) is not None:
                    found |= rest.holders
                if (same := children.get(level)) is not None:
                    following.append(same)
                if (one := children.get("+")) is not None:
                    following.append(one)
            if not following:
                return found
            nodes = following
        for node in nodes:
            found |= node.holders
            if (rest := node.children.get("#")) is not None:
                found |= rest.holders  # "a/#" matches "a" too
        return found
