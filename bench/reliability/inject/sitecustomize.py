"""ENOSPC injection for bench.reliability.enospc where no tmpfs can be mounted.

On this folder's PYTHONPATH with RELIABILITY_ENOSPC_AFTER=K set, `os.replace` and `os.rename`
(the atomic-write layer's commit) raise OSError(ENOSPC) from the (K+1)-th call on.
"""

import errno
import os

_after = os.environ.get("RELIABILITY_ENOSPC_AFTER")
if _after is not None:
    _calls = [0]

    def _full(real):
        def replace(src, dst, *args, **kwargs):
            _calls[0] += 1
            if _calls[0] > int(_after):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real(src, dst, *args, **kwargs)

        return replace

    os.replace = _full(os.replace)
    os.rename = _full(os.rename)
