"""The index family: the tables (models), the databases they live in (backends), their schema
versions (migrations), the serialized writer and its reads (core), the routing outbox, and the
copy between databases. `Index` and `Added` are re-exported: `from pacsd.index import Index`.
"""

from pacsd.index.core import Added, Index

__all__ = ["Added", "Index"]
