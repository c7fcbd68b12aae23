"""Constructor checks shared by the modules: a count that is not an integer of the allowed range is a
ValueError naming the module, the argument and the value (torch's own layers accept a 0 or negative channel
count and fail later, deep in a conv, with a message that names neither)."""

from __future__ import annotations

import operator


def check_count(owner: str, name: str, value: object, least: int = 1) -> int:
    """`value` as an int if it is an integer >= `least` (Python, numpy or 0-d torch integers; not a bool or
    a float); ValueError naming `owner`, `name` and `value` otherwise."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < least:
        kind = "a positive int" if least == 1 else f"an int >= {least}"
        raise ValueError(f"{owner}: {name} {value!r} must be {kind}")
    return count
