"""peewee's model metadata (`Model._meta`), read in one place.

`_meta` is documented peewee API (peewee's "Model options and table metadata"), not an
internal; it is read through here so that a grep for private names finds other libraries'
members only in pacsd.compat. No check: peewee documents it.
"""

from __future__ import annotations

from peewee import Field, Model


def table_name(model: type[Model]) -> str:
    """The model's table name."""
    return str(model._meta.table_name)


def sorted_fields(model: type[Model]) -> list[Field]:
    """The model's fields in declaration order (the order of its table's columns)."""
    return list(model._meta.sorted_fields)

