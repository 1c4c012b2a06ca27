import pytest
import torch

from flextron.errors import FlextronError
from flextron.options import RouteOptions, TrainOptions
from flextron.precision import compute_dtype
from flextron.train.loop import teacher_dtype


def test_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert compute_dtype("auto", "cuda") is torch.bfloat16
    assert compute_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert compute_dtype("auto", "cpu") is None and compute_dtype("auto") is None
    assert compute_dtype("bf16", "cpu") is torch.bfloat16 and compute_dtype("fp32", "cuda") is None
    assert teacher_dtype("auto", torch.device("cpu")) is torch.float32
    assert teacher_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_training_and_routing_default_to_auto():
    assert TrainOptions(max_steps=1).dtype == "auto" and RouteOptions().dtype == "auto"


def test_unknown_dtype_is_refused_in_one_line():
    with pytest.raises(FlextronError, match="unknown dtype 'fp16'; use auto, fp32 or bf16"):
        compute_dtype("fp16")
    with pytest.raises(FlextronError, match="must be one of auto, fp32, bf16"):
        RouteOptions(dtype="fp16")
