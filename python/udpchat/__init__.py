"""udpchat: group chat and fan-out over UDP with heartbeat liveness.

The networking runs in a Rust core on its own threads, outside the GIL. Log records go to
Python's ``logging`` under the ``udpchat`` logger (``udpchat.server``, ``udpchat.client``, ...).
"""

from ._asyncio import ChatClientUdp, ChatServerUdp
from ._udpchat import (
    MAX_DATAGRAM,
    MAX_MESSAGE,
    Event,
    Message,
    Peer,
    __version__,
    reset_log_cache,
)

__all__ = [
    "MAX_DATAGRAM",
    "MAX_MESSAGE",
    "ChatClientUdp",
    "ChatServerUdp",
    "Event",
    "Message",
    "Peer",
    "__version__",
    "reset_log_cache",
]
