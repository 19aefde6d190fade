"""Where the model runs and in which precision: one choice for training and captioning; which
contiguous share of the work each process of a launcher takes."""


def pick_device(device="auto"):
    """auto: cuda, then Apple's mps, then cpu."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def shard_range(n, rank, world):
    """Contiguous [start, end) of n items for process `rank` of `world`: every item exactly
    once, in order when the shards are concatenated by rank."""
    per = -(-n // world)
    return min(n, rank * per), min(n, (rank + 1) * per)


def cuda_capability():
    """(major, minor) of the current CUDA device, or None without one."""
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def choose_precision(requested, device_type, capability=None):
    """-> "fp32", "bf16" or "fp16".

    auto: bf16 only where the GPU computes it natively (compute capability 8.0 and up:
    A100, RTX 30xx, H100 ...). torch.cuda.is_bf16_supported() also counts emulated bf16,
    which is slow on V100 and T4, so it is not asked. fp16 on older GPUs; fp32 on CPU and mps.
    """
    if requested == "auto":
        if device_type != "cuda":
            return "fp32"
        return "bf16" if capability is not None and tuple(capability) >= (8, 0) else "fp16"
    if requested in ("bf16", "fp16") and device_type != "cuda":
        raise ValueError(f"--precision {requested} needs a CUDA GPU; use fp32 or auto on "
                         f"{device_type}")
    return requested
