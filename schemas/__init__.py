"""The wire contract of agent-fabric: subjects, message types, error codes.

Import the domain modules directly (``schemas.agent``, ``schemas.command``,
``schemas.node``, ``schemas.task``, ``schemas.event``, ``schemas.logs``,
``schemas.discovery``); decode network bytes only through ``schemas.codec``
and build subjects only through ``schemas.subjects``.
"""

from schemas.codec import decode, encode
from schemas.errors import ContractError, ErrorCode, ErrorReply
from schemas.ids import validate_id

__all__ = ["ContractError", "ErrorCode", "ErrorReply", "decode", "encode", "validate_id"]
