"""The one way pm_lens names a node: a feature of the SAE at a hook, or that hook's error node.

Every table, CSV, report and argument uses :class:`Node`; its string form, ``"hook:feature"`` or
``"hook:error"`` (e.g. ``"blocks.8.hook_resid_post:236"``), is written by ``str(node)`` and read
back by :meth:`Node.parse`, nowhere else. Tables carry the string in a ``node`` column beside
``hook_name`` and ``feature`` (empty for an error node).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ERROR = "error"


@dataclass(frozen=True)
class Node:
    """Feature ``feature`` of the SAE at ``hook_name``, or, with ``feature=None``, its error node."""

    hook_name: str
    feature: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise TypeError(f"a node's hook_name must be a non-empty string, got {self.hook_name!r}")
        if self.feature is not None and (isinstance(self.feature, bool) or not isinstance(self.feature, int)
                                         or self.feature < 0):
            raise TypeError(f"a feature index must be an integer >= 0 (or None for the error node), got {self.feature!r}")

    @classmethod
    def error(cls, hook_name: str) -> Node:
        """The error node of the SAE at ``hook_name``: what the SAE does not reconstruct."""
        return cls(hook_name, None)

    @property
    def is_error(self) -> bool:
        return self.feature is None

    def __str__(self) -> str:
        return f"{self.hook_name}:{ERROR if self.feature is None else self.feature}"

    @classmethod
    def parse(cls, text: str) -> Node:
        """The node written as ``str(node)``."""
        hook, sep, index = text.rpartition(":")
        if not sep or not hook or not (index == ERROR or index.isdigit()):
            raise ValueError(f"not a node: {text!r}; nodes are written 'hook_name:feature' or 'hook_name:error'")
        return cls(hook, None if index == ERROR else int(index))

    def sort_key(self) -> tuple[str, int]:
        return (self.hook_name, -1 if self.feature is None else self.feature)


ALLOWED = "Node objects, (hook_name, index) pairs or 'hook_name:index' strings ('hook_name:error' for an error node)"


def as_node(item: Any, widths: Mapping[str, int]) -> Node:
    """One node from what a user may write (see :func:`as_nodes`), checked against ``widths``
    (``d_sae`` by hook name)."""
    if isinstance(item, Node):
        node = item
    elif isinstance(item, str):
        node = Node.parse(item)
    elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        hook, index = item
        if index == ERROR:
            node = Node.error(hook)
        elif hasattr(index, "item") and getattr(index, "ndim", 1) == 0:  # a 0-d tensor or numpy integer
            node = Node(hook, _integer(index.item(), hook))
        else:
            node = Node(hook, _integer(index, hook))
    elif _is_integer(item) and len(widths) == 1:
        node = Node(next(iter(widths)), int(item))  # a bare index, with one SAE to belong to
    elif _is_integer(item):
        raise TypeError(f"feature {int(item)} is a bare index, but there are SAEs at {sorted(widths)}: "
                        "give (hook_name, index) pairs")
    else:
        raise TypeError(f"nodes must be {ALLOWED}; got {item!r}")
    if node.hook_name not in widths:
        raise ValueError(f"no SAE at {node.hook_name!r}; SAEs are at {sorted(widths)}")
    if node.feature is not None and node.feature >= widths[node.hook_name]:
        raise ValueError(f"feature {node.feature} does not exist at {node.hook_name}: valid are "
                         f"0..{widths[node.hook_name] - 1}")
    return node


def as_nodes(items: Any, widths: Mapping[str, int]) -> list[Node]:
    """Nodes from one node or an iterable of them, each a :class:`Node`, a ``(hook_name, index)``
    pair (``index`` ``"error"`` for the error node), a ``"hook_name:index"`` string, or a bare
    index when there is one SAE. Raises a TypeError or ValueError naming what is wrong."""
    if isinstance(items, (Node, str)) or (isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], str)) \
            or _is_integer(items):
        items = [items]
    if not isinstance(items, Iterable):
        raise TypeError(f"nodes must be {ALLOWED}, or a list of them; got {type(items).__name__}")
    nodes = [as_node(item, widths) for item in items]
    if not nodes:
        raise ValueError("no nodes given")
    return nodes


def _is_integer(value: Any) -> bool:
    return not isinstance(value, bool) and (isinstance(value, int) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0
                                                                     and float(value.item()).is_integer()))


def _integer(index: Any, hook: str) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"a feature index must be an integer (or 'error'), got {index!r} for {hook}")
    if index < 0:
        raise ValueError(f"feature index {index} at {hook} is negative; an error node is (hook_name, 'error') "
                         "or Node.error(hook_name)")
    return index
