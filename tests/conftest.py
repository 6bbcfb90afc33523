import os
import sys
import tempfile

# Generated datasets go to a private folder, not the repo's datasets/; set before any import of
# detectron2 or d2_focalstar (both read it when imported), and inherited by subprocesses.
os.environ.setdefault("DETECTRON2_DATASETS", tempfile.mkdtemp(prefix="d2fs-datasets-"))

# Without a GPU, Triton kernels run in its interpreter on the CPU (read when triton is imported).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # train_net.py
