"""Enrollment probe: what this machine can do for the run (device, memory, measured throughput)."""

from __future__ import annotations

import logging
import platform
import time

import psutil
import torch

from dht import Capacity
from node.config import ModelConfig
from node.model import build_run_model

logger = logging.getLogger(__name__)


class CapacityError(Exception):
    """This machine cannot join the run as configured; the message says why and what to do."""


def pick_device(requested: str = "auto") -> torch.device:
    """Resolve ``auto`` to the best available device; check an explicit one exists."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CapacityError(f"device {requested} requested but CUDA is not available; use --device cpu")
    return device


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(psutil.virtual_memory().total)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return platform.processor() or platform.machine()


def measure_throughput(config: ModelConfig, batch_size: int, device: torch.device, steps: int = 3) -> float:
    """Samples per second of forward+backward on the run's model (after one warm-up step)."""
    model = build_run_model(config, seed=0, load_weights=False).to(device)  # the speed of its shape, any weights
    tokens = torch.randint(0, _shape(config)[3], (batch_size, config.context), device=device)
    elapsed = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        model(tokens, tokens).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:
            elapsed += time.perf_counter() - start
    return steps * batch_size / max(elapsed, 1e-9)


def probe_capacity(
    config: ModelConfig,
    batch_size: int,
    device: torch.device,
    min_memory_gb: float,
    allow_low_memory: bool = False,
    upload_bytes_per_second: float = 0.0,
) -> Capacity:
    """Measure this machine and check it against the run's minimum memory.

    Raises:
        CapacityError: memory is below ``min_memory_gb`` and ``allow_low_memory`` is off.
    """
    memory = device_memory_bytes(device)
    if memory < min_memory_gb * 1024**3:
        message = (
            f"this machine has {memory / 1024**3:.1f} GB of {device.type} memory, under the run's minimum "
            f"of {min_memory_gb:g} GB"
        )
        if not allow_low_memory:
            raise CapacityError(message + "; pass --allow-low-memory to join anyway")
        logger.warning(message + "; continuing because --allow-low-memory is set")
    return Capacity(
        device_kind=device.type if device.type in ("cpu", "cuda", "mps", "xpu") else "cpu",
        device_name=device_name(device)[:128],
        memory_bytes=memory,
        samples_per_second=measure_throughput(config, batch_size, device),
        upload_bytes_per_second=upload_bytes_per_second,
    )


def activation_bytes(config: ModelConfig, batch_size: int) -> int:
    """Rough training memory of one step's activations (float32): per token and layer about 34 d_model
    values plus 5 n_head * context for attention (the usual transformer estimate), plus the logits."""
    n_layer, d_model, n_head, vocab = _shape(config)
    per_layer = 34 * d_model + 5 * n_head * config.context
    return 4 * batch_size * config.context * (n_layer * per_layer + 2 * vocab)


def _shape(config: ModelConfig) -> tuple[int, int, int, int]:
    """(layers, width, heads, vocabulary) of the run's model; an "hf" model's from its config.json."""
    if config.family != "hf":
        return config.n_layer, config.d_model, config.n_head, config.vocab_size
    from node.model_hf import load_hf_config

    hf = load_hf_config(config)
    return hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.vocab_size


def fit_batch_size(config: ModelConfig, batch_size: int, device: torch.device) -> int:
    """The run's batch size, halved until one training step fits the device (a small GPU sends fewer samples).

    On CUDA a real step is tried (out of memory: halve); elsewhere the estimate must fit in half the
    available memory. The node's weight in a group is its sample count, so a smaller batch only
    lowers its share.
    """
    fitted = batch_size
    while fitted > 1:
        if device.type == "cuda":
            try:
                measure_throughput(config, fitted, device, steps=1)
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        elif activation_bytes(config, fitted) <= psutil.virtual_memory().available // 2:
            break
        fitted //= 2
    if fitted < batch_size:
        logger.warning(f"batch size {batch_size} does not fit this {device.type} device; training with {fitted}")
    return fitted
