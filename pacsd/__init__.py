"""pacsd: a lean, set-and-forget PACS server."""

__version__ = "0.1.0"
