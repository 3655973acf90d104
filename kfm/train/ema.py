"""Exponential moving average (EMA) of the model's weights, kept beside the training weights.

After every optimizer step (`EMA.update`)::

    ema = d_t * ema + (1 - d_t) * param,     d_t = min(train.ema_decay, (1 + t) / (10 + t))

where t = 1, 2, ... counts the updates. The warm-up of d_t (as TensorFlow's
ExponentialMovingAverage with ``num_updates``) keeps the first averages from being dominated by
the random initialisation: d_1 = 0.18, d_10 = 0.55, d_100 = 0.92, and 0.999 is reached at
t = 8991. An update the bad-step guard skipped leaves the EMA unchanged too (its weight is 0;
the count still advances, so d_t is a function of the step alone).

Each rank averages only its own shard: a DTensor parameter (FSDP2, tensor parallel) gets an
fp32 DTensor EMA with the same placements, and the update is a local ``lerp`` over the local
shards, with no communication. Memory: one fp32 copy of this rank's parameter shard (4 bytes
per parameter / dp_shard; an 8B model over dp_shard=256 ranks: 32 GB / 256 = 125 MB per rank).

The EMA's state dict has the model's state-dict keys (tied weights under both names, as
``get_model_state_dict`` gives them), so DCP saves it as ``ema.<fqn>`` beside ``model.<fqn>``
and reshards it on load exactly like the model. `applied` swaps the EMA into the live model for
evaluation and back, one tensor at a time (no second model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

# Module wrappers that add a segment to parameter names (torch.compile, activation
# checkpointing, DDP-style wrappers); checkpoints use the names without them.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")


def ema_decay_at(t: int, decay: float) -> float:
    """The decay of update ``t`` (1-based): min(decay, (1 + t) / (10 + t))."""
    return min(decay, (1 + t) / (10 + t))


def _local(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (``t`` itself unless it is a DTensor), as a view: in-place ops
    on it change ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def _clean(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


class EMA:
    """fp32 EMA of ``model``'s parameters (this rank's shards), keyed like its checkpoint.

    Build it after the model is parallelised (its parameters are then the sharded DTensors)
    and before any weights are loaded into it: `reset` copies the current weights in again.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        *,
        after_swap: Callable[[], None] | None = None,
    ) -> None:
        """``after_swap``: called after `applied` changes the weights in place (the backend's
        fp8 scale precompute, which depends on them).

        Raises:
            ValueError: ``decay`` outside (0, 1), a parameter that is not fp32, or parameter
                names that do not match the model's checkpoint keys (an unknown wrapper).
        """
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1)")
        self.decay = decay
        self.updates = 0
        """Updates done so far (t of the last update); saved in the trainer state."""
        self.after_swap = after_swap
        # keep_vars=True: the Parameter objects themselves, a tied weight under each of its names.
        named = {
            _clean(k): v
            for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, nn.Parameter)
        }
        expected = set(get_model_state_dict(model))
        if set(named) != expected:
            raise ValueError(
                f"EMA: parameter names {sorted(set(named) ^ expected)[:4]} differ from the "
                "model's checkpoint keys (a module wrapper kfm does not know?)"
            )
        self.params: list[nn.Parameter] = []
        self.shadow: list[Tensor] = []
        by_param: dict[int, Tensor] = {}
        self._state: dict[str, Tensor] = {}
        for name, param in named.items():
            if param.dtype != torch.float32:
                # kfm keeps fp32 master weights (bf16 only in compute); a swap through a bf16
                # parameter would round the EMA.
                raise ValueError(f"EMA: parameter {name} is {param.dtype}, expected float32")
            if id(param) not in by_param:
                with torch.no_grad():
                    by_param[id(param)] = param.detach().to(torch.float32, copy=True)
                self.params.append(param)
                self.shadow.append(by_param[id(param)])
            self._state[name] = by_param[id(param)]  # tied names share one EMA tensor
        self._local_params = [_local(p) for p in self.params]
        self._local_shadow = [_local(s) for s in self.shadow]

    @torch.no_grad()
    def update(self, skipped: Tensor | None = None) -> None:
        """One EMA step toward the current parameters (after the optimizer step). ``skipped``:
        the guard's 0/1 flag on the device; 1 leaves the EMA as it is (no host sync either way).
        """
        self.updates += 1
        weight = 1.0 - ema_decay_at(self.updates, self.decay)
        device = self._local_shadow[0].device
        # torch.full is a fill kernel: no host-to-device copy (torch.tensor would sync on CUDA).
        w = torch.full((), weight, dtype=torch.float32, device=device)
        if skipped is not None:
            w = w * (1.0 - skipped.to(device=device, dtype=torch.float32))
        # ema += w * (param - ema), on the local shards only
        torch._foreach_lerp_(self._local_shadow, self._local_params, [w] * len(self.params))

    @torch.no_grad()
    def reset(self) -> None:
        """Set the EMA to the current weights and the count to 0 (after loading weights into a
        fresh run: checkpoint.init_from, or a resume from a checkpoint saved without an EMA)."""
        for s, p in zip(self._local_shadow, self._local_params, strict=True):
            s.copy_(p)
        self.updates = 0

    def state_dict(self) -> dict[str, Tensor]:
        """{fqn: fp32 EMA tensor} with the model's checkpoint keys; the tensors are the live EMA
        (DCP loads into them in place)."""
        return dict(self._state)

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Inside, the model's parameters hold the EMA weights (the training weights wait in the
        EMA's tensors); on exit they are swapped back, bit for bit. Cost: 3 copies of this
        rank's shard each way, and a temporary the size of the largest one tensor."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for p, s in zip(self._local_params, self._local_shadow, strict=True):
            tmp = p.clone()
            p.copy_(s)
            s.copy_(tmp)
        if self.after_swap is not None:
            self.after_swap()
