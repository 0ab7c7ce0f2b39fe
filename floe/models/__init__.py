"""Model folders: where they come from (source.py) and what they declare (st_config.py, spec.py).

Nothing here imports torch: the front end loads a ModelSpec to tokenize and validate requests.
"""

from floe.models.describe import describe
from floe.models.source import resolve_model_path
from floe.models.spec import DenseSpec, ModelSpec
from floe.models.st_config import load_spec

__all__ = ["DenseSpec", "ModelSpec", "describe", "load_spec", "resolve_model_path"]
