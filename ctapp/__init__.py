"""CT slice classifier core: data, preprocessing, models, checkpoints,
inference, Grad-CAM and metrics. No Streamlit here (except ``ui_cache``)."""
from .checkpoint import CheckpointError
from .imaging import ImageDecodeError, decode
from .inference import LoadedModel, Prediction
from .model_folders import list_models, load_model

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ImageDecodeError", "LoadedModel", "Prediction", "decode", "list_models",
           "load_model", "__version__"]
