"""What each network sees while diffusers' own pipeline runs: recorded inputs (by spec names) of real traffic,
used by calibrate's held-out checks and by compare's per-component comparison."""

from __future__ import annotations

from typing import Any

from sd35trt.core.specs import SPECS


class TrafficRecorder:
    """Record a network's inputs (spec names) while the real pipeline runs: the report's held-out inputs."""

    def __init__(self, pipe: Any, components: tuple[str, ...], limit: int = 64):
        self.calls: dict[str, list[dict[str, Any]]] = {c: [] for c in components}
        self.handles = []
        for name in components:
            spec = SPECS[name]
            network = getattr(pipe, spec.pipeline_attr)
            self.handles.append(network.register_forward_hook(self._hook(name, spec, limit), with_kwargs=True))

    def _hook(self, name, spec, limit):
        def hook(_module, args, kwargs, _output):
            if len(self.calls[name]) >= limit:
                return
            values = dict(zip(spec.input_names, args))
            values.update({k: v for k, v in kwargs.items() if k in spec.input_names})
            self.calls[name].append({k: values[k].detach().float().cpu() if values[k].is_floating_point()
                                     else values[k].detach().cpu() for k in spec.input_names})
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def spread(items: list[Any], keep: int) -> list[Any]:
    """``keep`` items evenly spread over ``items`` (first and last included)."""
    if len(items) <= keep:
        return list(items)
    return [items[round(i * (len(items) - 1) / (keep - 1))] for i in range(keep)] if keep > 1 else items[:1]
