"""What each network sees while diffusers' own pipeline runs: recorded inputs (by spec names) of real traffic,
used by calibrate's held-out checks and by compare's per-component comparison."""

from __future__ import annotations

from typing import Any

from sd35trt.core.specs import SPECS


class TrafficRecorder:
    """Record a network's inputs (spec names) while the real pipeline runs: the report's held-out inputs."""

    def __init__(self, pipe: Any, components: tuple[str, ...], limit: int | None = 64,
                 only: dict[str, set[int]] | None = None):
        """The first ``limit`` calls of each network (None: all), or for those named in ``only`` the calls of those
        indices (0 = the network's first call while recording)."""
        self.calls: dict[str, list[dict[str, Any]]] = {c: [] for c in components}
        self.seen = dict.fromkeys(components, 0)
        self.handles = []
        for name in components:
            spec = SPECS[name]
            network = getattr(pipe, spec.pipeline_attr)
            keep = (only or {}).get(name)
            self.handles.append(network.register_forward_hook(self._hook(name, spec, limit, keep), with_kwargs=True))

    def _hook(self, name, spec, limit, keep):
        def hook(_module, args, kwargs, _output):
            index = self.seen[name]
            self.seen[name] += 1
            wanted = index in keep if keep is not None else limit is None or len(self.calls[name]) < limit
            if not wanted:
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


def sample_calls(batches: int, steps: int, keep: int) -> set[int]:
    """Up to ``keep`` (distinct) of the transformer's ``batches × steps`` calls (call ``b × steps + s`` is step ``s``
    of prompt batch ``b``), the steps spread evenly from first to last and the batches taken in turn, so that neither repeats
    while the other could differ. All of them when ``keep`` covers them."""
    total = batches * steps
    if keep >= total:
        return set(range(total))
    picked = set()
    for j in range(keep):
        step = round(j * (steps - 1) / (keep - 1)) if keep > 1 else 0
        batch = j % batches if keep >= batches else j * batches // keep
        picked.add(batch * steps + step)
    return picked
