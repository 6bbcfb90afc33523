import os
import sys
import tempfile

# Generated datasets go to a private folder, not the repo's datasets/; set before any import of
# detectron2 or d2_focalstar (both read it when imported), and inherited by subprocesses.
os.environ.setdefault("DETECTRON2_DATASETS", tempfile.mkdtemp(prefix="d2fs-datasets-"))

# Without a GPU, the fused Triton kernel runs in Triton's interpreter on the CPU, in this process:
# triton.jit reads TRITON_INTERPRET when d2_focalstar.modeling.fused is imported. It is then removed
# from the environment, so that the trainings the tests start as subprocesses use the (fast)
# reference loss on the CPU, as a user's CPU run does.
try:
    import torch

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            from triton import knobs

            import d2_focalstar.modeling.fused  # noqa: F401

            knobs.runtime.interpret = True  # the interpreter reads it again at launch
        except ImportError:  # no Triton: tests/test_fused.py skips itself
            pass
        del os.environ["TRITON_INTERPRET"]
except ImportError:
    pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # train_net.py


import pytest  # noqa: E402

QUICKSTART_ITERS = 200


@pytest.fixture(scope="session")
def quickstart_model(tmp_path_factory):
    """(OUTPUT_DIR, output) of the one short quickstart training of the test run, shared by the
    tests that need a trained model: RetinaNetFLStar (FL*, g 0.25) on the embedded data, 200
    iterations on the CPU, evaluated at the end, checkpoints at 100 and 200."""
    from helpers import QUICKSTART, run_here

    out = tmp_path_factory.mktemp("quickstart")
    proc = run_here(
        "train_net.py",
        *QUICKSTART,
        "SOLVER.MAX_ITER",
        str(QUICKSTART_ITERS),
        "SOLVER.STEPS",
        "(150, 180)",
        "SOLVER.CHECKPOINT_PERIOD",
        "100",
        "OUTPUT_DIR",
        str(out),
        check=True,
    )
    return out, proc.output
