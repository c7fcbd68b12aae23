"""Whole-volume prediction with a network: sliding windows, test-time mirroring, the 2-D slice stacks.

predict_probabilities takes a z-scored (D, H, W) array, or (C, D, H, W) for a network trained on C
image channels, and returns float32 probabilities (D, H, W). 3-D networks run sliding windows of the
training patch, stitched on the network's device (on a GPU, on the CPU if the volume's buffers do not fit
there); 2-D networks trained on stacks of k slices predict slice by slice, each from its k neighbours
(edge slices repeated at the volume's ends) of every channel, stitched on the CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch

from prostate_kernels.inference import sliding_window_inference
from prostate_kernels.progress import progress_bar

PATCH_WINDOWS_PER_CALL = 4  # windows of the training patch per network call (validation, predict)


def predict_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    patch: tuple[int, int, int],
    slices: int = 0,
    device: torch.device | str = "cpu",
    overlap: float = 0.5,
    mode: str = "gaussian",
    tta: bool = False,
    sw_batch_size: int = PATCH_WINDOWS_PER_CALL,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    device = torch.device(device)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return torch.sigmoid(model(windows.to(device)).float())

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
            volume = volume[None] if volume.dim() == 3 else volume  # (C, D, H, W)
            if slices:
                return _slice_stacks(
                    volume, predictor, patch, slices, overlap, mode, tta, sw_batch_size, device, progress
                )

            def stitch(on: torch.device) -> torch.Tensor:
                return sliding_window_inference(
                    volume[None].to(on), patch, sw_batch_size, predictor, overlap=overlap,
                    mode=mode, sw_device=device, device=on, progress=progress,
                    flip_axes=(0, 1, 2) if tta else (),
                )  # fmt: skip

            return stitched_on_device_or_cpu(stitch, device)[0, 0].cpu().numpy()
    finally:
        model.train(was_training)


_FELL_BACK: set[str] = set()  # devices whose out-of-memory fall-back has been announced


def stitched_on_device_or_cpu(
    stitch: Callable[[torch.device], torch.Tensor], device: torch.device
) -> torch.Tensor:
    """stitch(device): the volume, its output and weight buffers on the GPU (stitched by the Triton
    kernels); if they do not fit (out-of-memory), stitch(cpu) instead, the windows still predicted on
    the GPU, and say so once per device (MONAI issue 6200 and nnU-Net PR 2980 do the same)."""
    if device.type == "cpu":
        return stitch(device)
    try:
        return stitch(device)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if str(device) not in _FELL_BACK:
            _FELL_BACK.add(str(device))
            print(
                f"warning: the volume's stitching buffers do not fit on {device}: stitching on the CPU "
                "(windows are still predicted on the GPU)",
                file=sys.stderr,
            )
        return stitch(torch.device("cpu"))


def _slice_stacks(volume, predictor, patch, slices, overlap, mode, tta, sw_batch_size, device,
                  progress) -> np.ndarray:  # fmt: skip
    """Each slice z of volume (C, D, H, W) predicted from slices [z - k//2, z + k//2] of every channel as
    channels (channel-major, as PatchSampler stacks them), in-plane sliding windows; progress: one bar
    over the slices."""
    half = slices // 2
    edges = (volume[:, :1].expand(-1, half, -1, -1), volume[:, -1:].expand(-1, half, -1, -1))
    padded = torch.cat([edges[0], volume, edges[1]], dim=1)  # (C, D + 2 * half, H, W)
    depth = volume.shape[1]
    out = np.empty(volume.shape[1:], dtype=np.float32)
    with progress_bar(depth, "slices", "slice", enabled=progress) as bar:
        for z in range(depth):
            stack = padded[:, z : z + slices].flatten(0, 1)[None]  # (1, C * k, H, W)
            prob = sliding_window_inference(
                stack.contiguous(), patch[1:], sw_batch_size, predictor, overlap=overlap, mode=mode,
                sw_device=device, device="cpu", flip_axes=(0, 1) if tta else (),
            )  # fmt: skip
            out[z] = prob[0, 0].numpy()
            bar.update(1)
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a binary (D, H, W) mask (SimpleITK's filters)."""
    import SimpleITK as sitk

    if not mask.any():
        return mask
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False)
    largest = sitk.RelabelComponent(components, sortByObjectSize=True) == 1
    return sitk.GetArrayFromImage(largest).astype(np.uint8)
