"""Reading a YAML policy: PyYAML's safe loader, its errors in one line naming the file.

Imported only when a YAML policy is read (a JSON policy, or none, does not load PyYAML).
"""

from __future__ import annotations

from typing import Any

import yaml

from meshid.errors import InvalidPolicyError

__all__ = ["error", "load"]


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with tagged scalars (``!!bool maybe``, ``!!timestamp x``) refused as
    YAML errors at their line instead of as a bare KeyError or AttributeError, and a key given
    twice in one mapping refused at its second place (PyYAML keeps the last, so a second
    ``deny:`` would silently drop the first one's rules)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys given here override it
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the safe loader's own check reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"the key {key!r} is given twice (the second would replace the first)",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _checked_scalar(kind: str, construct: Any) -> Any:
    def checked(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as err:
            value = node.value if isinstance(node.value, str) else ""
            shown = repr(value if len(value) <= 40 else value[:40] + "...")
            reason = f": {err}" if isinstance(err, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown} is not a valid {kind}{reason}", node.start_mark
            ) from err

    return checked


for _tag, _kind, _construct in (
    ("bool", "boolean (write true or false)", yaml.constructor.SafeConstructor.construct_yaml_bool),
    ("int", "integer", yaml.constructor.SafeConstructor.construct_yaml_int),
    ("float", "number", yaml.constructor.SafeConstructor.construct_yaml_float),
    ("timestamp", "date or timestamp (e.g. 2024-01-31)", yaml.constructor.SafeConstructor.construct_yaml_timestamp),
):
    _YamlLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _checked_scalar(_kind, _construct))


def error(origin: str, err: yaml.YAMLError, kind: str = "policy") -> InvalidPolicyError:
    """One line naming the file (after ``kind``: "policy", "policy cases"), the line and column,
    and what the parser found there."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        found = "; ".join(" ".join(str(part).split()) for part in (err.context, err.problem) if part)
        where = f"line {mark.line + 1} column {mark.column + 1}"
        return InvalidPolicyError(f"{kind} {origin}: invalid YAML at {where}: {found}")
    return InvalidPolicyError(f"{kind} {origin}: invalid YAML: {' '.join(str(err).split())}")


def load(text: str) -> Any:
    """Parse ``text`` with the safe loader above. Raises yaml.YAMLError."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass
