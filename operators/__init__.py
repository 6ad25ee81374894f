"""The backend layer: platform probe, op registry, references and faster backends.

Import ops from here: ``from operators import ops; ops.gla(q, k, v, g)``. Each op is an
:class:`operators.registry.Op`: calling it dispatches to the best backend that accepts the
call (``SBTRAIN_OPS=op:backend`` forces one); ``ops.NAME.reference`` is the plain version.
"""

from operators import ops
from operators.platform import communication_backend, default_device, detect_platform, platform_of
from operators.registry import OPS, Backend, Op

__all__ = ["OPS", "Backend", "Op", "communication_backend", "default_device", "detect_platform", "ops", "platform_of"]
