"""A stand-in accelerator on the CPU, for checking device placement where no GPU is lent.

Inside `fake_cuda()`, `torch.cuda.is_available()` is true and a tensor moved to `cuda` stays a CPU tensor
that says it is on `cuda:0` (the `OnDevice` subclass): real data, real arithmetic, so whole nodes run. Every
torch call is checked as CUDA would check it: an operation that mixes a tensor "on the device" with a CPU
tensor of one or more dimensions fails with CUDA's message, and so does `.numpy()` of a device tensor. What
it proves is placement (every input moved to where the model is, every result brought back before numpy),
not CUDA kernels, memory or speed: `qmllm gpu-check` measures those on a real GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("cuda", 0)
CPU = torch.device("cpu")


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on the accelerator."""

    @property
    def device(self) -> torch.device:
        return FAKE

    @property
    def is_cuda(self) -> bool:
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.as_subclass, torch.autograd.grad):  # results placed by what made them
            return result
        return torch._tensor._convert(result, cls)


def _on_device(value) -> bool:
    return isinstance(value, OnDevice)


def _tag(value):
    if isinstance(value, torch.Tensor) and not _on_device(value):
        return value.as_subclass(OnDevice)
    return value


def _untag(value):
    if _on_device(value):
        return value.as_subclass(torch.Tensor)
    return value


class _Move(torch.autograd.Function):
    """A move between the CPU and the stand-in device that autograd sees as one: the gradient goes back to
    where the tensor came from, as a real `.to(device)` sends it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, to_device: bool) -> torch.Tensor:
        ctx.from_device = _on_device(tensor)
        out = tensor.as_subclass(torch.Tensor).clone()
        return out.as_subclass(OnDevice) if to_device else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.as_subclass(torch.Tensor)
        return (grad.as_subclass(OnDevice) if ctx.from_device else grad), None


# calls that move or compare no data across devices (CUDA accepts them with mixed devices)
_UNCHECKED = {torch._has_compatible_shallow_copy_type, torch.Tensor.copy_}


class _FakeCuda(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if func is torch.Tensor.numpy and _on_device(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":  # a factory: torch.zeros(..., device=cuda)
            kwargs["device"] = CPU
            return tree_map(_tag, func(*args, **kwargs))
        if func is torch.autograd.grad:
            return self._grad(args, kwargs)
        self._check(func, args, kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _grad(args, kwargs):
        """`torch.autograd.grad`, each gradient placed where its input is (autograd's engine computes them
        below the Python layer, so the stand-in's mark has to be put back, as CUDA keeps the device)."""
        grads = torch.autograd.grad(*args, **kwargs)
        inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        return tuple(_tag(g) if g is not None and _on_device(i) else _untag(g) for g, i in zip(grads, inputs,
                                                                                               strict=True))

    def _move(self, func, args, kwargs):
        tensor = args[0]
        if func is torch.Tensor.cuda:
            return _tag(tensor)
        if func is torch.Tensor.cpu:
            return _untag(tensor)
        if kwargs.pop("copy", False):
            tensor = tensor.clone()
        other = next((a for a in (*args[1:], kwargs.get("other")) if isinstance(a, torch.Tensor)), None)
        if other is not None:  # .to(tensor): its device and dtype
            device, dtype = (FAKE if _on_device(other) else CPU), other.dtype
        else:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        on_device = _on_device(tensor) if device is None else torch.device(device).type == "cuda"
        if dtype is not None:
            tensor = tensor.to(dtype)
        if on_device == _on_device(tensor):
            return tensor
        if tensor.requires_grad and torch.is_grad_enabled():
            return _Move.apply(tensor, on_device)
        return _tag(tensor) if on_device else _untag(tensor)

    def _check(self, func, args, kwargs) -> None:
        if func in _UNCHECKED:
            return
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not any(_on_device(t) for t in tensors):
            return
        self.checked += 1
        mixed = [t for t in tensors if not _on_device(t) and t.dim() > 0]
        if mixed:
            name = getattr(func, "__name__", str(func))
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! ({name}: a CPU tensor of shape {tuple(mixed[0].shape)})")


@contextlib.contextmanager
def fake_cuda(monkeypatch) -> Iterator[_FakeCuda]:
    """Within it, `device: auto` resolves to `cuda` and tensors moved there are checked as CUDA would."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # Module.to keeps the subclass
    try:
        with _FakeCuda() as mode:
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
