import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from hypothesis import settings  # noqa: E402

settings.register_profile("lrjax", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("lrjax")
