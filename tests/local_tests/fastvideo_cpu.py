"""FastVideo on a CPU, in one process: what the families that port to FastVideo (wan, umt5) share.

FastVideo needs a one-process gloo "distributed" environment and an attention
backend (its ``CpuPlatform`` answers none: SDPA is pointed at), set up once by
:func:`setup_fastvideo`; its modules run inside its forward context
(:func:`forward_context`), as its pipelines call them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

_READY = False


def setup_fastvideo() -> None:
    """One-process distributed state and an SDPA attention backend, once per process."""
    global _READY
    if _READY:
        return
    os.environ.setdefault("FASTVIDEO_ATTENTION_BACKEND", "TORCH_SDPA")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    from fastvideo.attention.backends.sdpa import SDPABackend
    from fastvideo.distributed.parallel_state import maybe_init_distributed_environment_and_model_parallel
    from fastvideo.platforms import current_platform

    # FastVideo 0.2.1's CpuPlatform answers no attention backend; SDPA runs on the CPU.
    current_platform.get_attn_backend_cls = lambda *args, **kwargs: (  # type: ignore[method-assign]
        f"{SDPABackend.__module__}.{SDPABackend.__name__}")
    maybe_init_distributed_environment_and_model_parallel(1, 1)
    _READY = True


@contextlib.contextmanager
def forward_context(timestep: Any = 0) -> Iterator[None]:
    """FastVideo's ``set_forward_context`` with ``timestep`` (a DiT's; 0 for a text encoder), no attention metadata."""
    from fastvideo.forward_context import set_forward_context
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch

    with set_forward_context(current_timestep=timestep, attn_metadata=None,
                             forward_batch=ForwardBatch(data_type="dummy")):
        yield
