"""Old module path of :mod:`curvprune.models.zoo`, kept so old imports work (build an entry with
``curvprune.models.create_model("zoo:timm/resnet18")``).

``import curvprune.zoo`` gives that very module (every name, the same objects).
"""

import sys

from .models import zoo as _module

sys.modules[__name__] = _module
