"""Clients of modelql's (and LARQL's) servers. `KnowledgeClient`: the knowledge group (§4)."""

from .knowledge import (Decoded, Embedded, Health, KnowledgeClient, KnowledgeConnectionError, KnowledgeHTTPError,
                        LogitRow, PatchApplied, PatchInfo, PatchList, PatchRemoved, ServerStats)

__all__ = ["KnowledgeClient", "KnowledgeHTTPError", "KnowledgeConnectionError", "ServerStats", "Health", "PatchInfo",
           "PatchList", "PatchApplied", "PatchRemoved", "Embedded", "LogitRow", "Decoded"]
