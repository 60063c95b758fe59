"""Old module path of :mod:`curvprune.pruning.allocation`, kept so old imports work.

``import curvprune.allocation`` gives that very module (every name, the same objects).
"""

import sys

from .pruning import allocation as _module

sys.modules[__name__] = _module
