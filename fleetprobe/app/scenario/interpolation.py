"""``${VAR}`` and ``${VAR:-default}`` in scenario strings, filled from the environment.

Interpolation runs after YAML parsing and on string values only, so a variable's value can
never change the structure of the scenario. ``$${`` is a literal ``${``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """``text`` with every reference replaced.

    Raises:
        ValueError: a variable without default is unset, or a reference is malformed.
    """

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name is None:
            raise ValueError(
                "malformed ${...}: write ${NAME} or ${NAME:-default} (and $${ for a literal ${)"
            )
        value = environ.get(name)
        if value is not None:
            return value
        if default is not None:
            return default
        raise ValueError(
            f"environment variable {name} is not set (write ${{{name}:-default}} "
            "to make it optional)"
        )

    return _REFERENCE.sub(replace, text)
