"""`train --cuda-graphs`: the network's training-mode forward and backward replayed from CUDA graphs.

On the H100 a Tiramisu 3D p3a training step at 16x64x64 took 258 ms for 150 ms of kernels (issue 12,
run2's profile): the rest was Python, autograd and launches between small kernels. PyTorch's
`torch.cuda.make_graphed_callables` captures a module's forward and backward once and replays them, so a
step issues two graph launches instead of thousands of kernels. The loss, the optimizer (Adam, eager,
a few foreach kernels) and the gradient scaler stay outside the graphs: the learning-rate schedule, fp16
loss scaling, the finite-loss check, checkpoints and resume work as in an eager run.

What the capture must not change, and this module restores after it:
- the BatchNorm buffers (running statistics, batch counters): the warm-up and capture run the forward
  `warmups + 1` times on the first batch;
- the random number generators (CPU and CUDA): those runs draw dropout masks. A run resumed from a
  checkpoint captures again and restores the checkpoint's generators, so it draws what the unbroken run
  draws. A graph replay takes its draws from the CUDA generator's state at replay time.

Requirements (train() refuses the flag otherwise, naming the reason): a CUDA device, one process (no
torchrun: DistributedDataParallel's hooks are not captured here), and every batch of one shape (the
sampler's patches are). A module in eval mode runs its ordinary forward, so validation is eager.
Not yet run on a GPU: the GPU check `cuda graphs` of bench/gpu_checks.py trains a few iterations both
ways.
"""

from __future__ import annotations

import torch


def refusal(device: torch.device, world: int) -> str | None:
    """Why `--cuda-graphs` cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"--cuda-graphs needs a CUDA device; this run is on {device.type}"
    if world > 1:
        return f"--cuda-graphs trains in one process; this run has {world} (torchrun): drop one of the two"
    return None


def capture_training_step(
    model: torch.nn.Module, sample: torch.Tensor, amp_dtype: torch.dtype | None, warmups: int = 3
) -> None:
    """Replaces model's training-mode forward (and so its backward) by CUDA graph replays captured on
    `sample` (a batch of the shape every later call has, on the model's device), under the autocast
    dtype the training uses. Buffers and random generators are as before the call; parameters and their
    gradients are untouched (the warm-up takes gradients with torch.autograd.grad, not into .grad)."""
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(sample.device) if sample.is_cuda else None
    model.train()
    # no autocast cache inside a capture (make_graphed_callables refuses it)
    with torch.autocast(
        sample.device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False
    ):
        torch.cuda.make_graphed_callables(model, (sample,), num_warmup_iters=warmups, allow_unused_input=True)
    with torch.no_grad():
        for buffer, before in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(before)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, sample.device)
