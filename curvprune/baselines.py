"""Old module path of :mod:`curvprune.pruning.baselines`, kept so old imports work.

``import curvprune.baselines`` gives that very module (every name, the same objects).
"""

import sys

from .pruning import baselines as _module

sys.modules[__name__] = _module
