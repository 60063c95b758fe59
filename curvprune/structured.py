"""Old module path of :mod:`curvprune.pruning.structured`, kept so old imports work.

``import curvprune.structured`` gives that very module (every name, the same objects).
"""

import sys

from .pruning import structured as _module

sys.modules[__name__] = _module
