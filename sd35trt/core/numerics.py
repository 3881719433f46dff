"""FP16 range: an activation census of every module, FP32 islands chosen from it, and the hooks that run them.

Real SD3.5 has activations past FP16's 65504 in a few places (SD3.5-Large ``transformer_blocks.35``,
T5-XXL's feed-forward output); random weights never do. Instead of making a whole component FP32 for one
block, the block runs in FP32 inside the FP16/FP8 graph (cast in, cast out: what NVIDIA's demoDiffusion
``UpcastLayer`` does), so a strongly typed engine keeps it FP32 and everything else stays FP16/FP8.

* ``ActivationCensus``: forward hooks recording max |input| and max |output| of every module while the
  reference runs (running maxima kept on the device: no host sync per call).
* ``plan_islands``: a pure function from census + recipe to the islands, each with why.
* ``fp32_islands``: hooks that cast an island's inputs to FP32 and its outputs back (unless the output
  itself is past the margin, then it stays FP32 and its consumer is an island too). Hooks, not wrapper
  modules, so module names (ModelOpt quantizer names, ONNX scopes) stay unchanged.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

FP16_MAX = 65504.0
DEFAULT_MARGIN = 2.0**14


def _max_abs(value: Any) -> list[Any]:
    """Device tensors of max |x| of every floating tensor in ``value`` (tensor, tuple/list, dict, output).

    A tensor whose max |x| is exactly its dtype's largest finite value is an additive attention mask (eager
    attention fills with ``finfo.min``), not an activation, and counts as 0; real overflow is inf, not that.
    Stays on the device (no sync per call)."""
    import torch

    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or not value.numel():
            return []
        peak = value.detach().abs().amax()
        return [torch.where(peak == torch.finfo(value.dtype).max, 0.0, peak.float())]
    if isinstance(value, (tuple, list)):
        return [m for item in value for m in _max_abs(item)]
    if isinstance(value, dict):
        return [m for item in value.values() for m in _max_abs(item)]
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        return _max_abs(value.to_tuple())
    return []


def _output_maxima(output: Any) -> list[Any]:
    """Per output position (a tuple's elements, or the one tensor): max |x| or None for non-tensors."""
    import torch

    items = output if isinstance(output, tuple) else (output,)
    return [item.detach().abs().amax().float() if isinstance(item, torch.Tensor) and item.is_floating_point()
            and item.numel() else None for item in items]


def _tensors(value: Any) -> list[Any]:
    """Every tensor in ``value`` (a tensor, or tuples/lists/dicts of them), in order."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


class ActivationCensus:
    """Running max |input| / max |output| (and per output position) of every module of some networks, and which
    module's output each module receives (``feeds``: the data flow between modules, by tensor identity, so two
    islands that hand a value one to the other can keep it FP32 between them)."""

    def __init__(self, networks: dict[str, Any]):
        self._in: dict[tuple[str, str], Any] = {}
        self._out: dict[tuple[str, str], list[Any]] = {}
        self._made: dict[int, tuple[Any, list[tuple[str, str, int]]]] = {}  # id(tensor) -> (weakref, producers)
        self._feeds: dict[tuple[str, str], set[tuple[str, int]]] = {}
        self._order: dict[tuple[str, str], int] = {}  # the order modules first finished a call (children first)
        self._handles = []
        for component, network in networks.items():
            for name, module in network.named_modules():
                if name:
                    self._handles.append(module.register_forward_hook(self._hook(component, name), with_kwargs=True))

    def _producers(self, tensor: Any) -> list[tuple[str, str, int]]:
        found = self._made.get(id(tensor))
        return found[1] if found is not None and found[0]() is tensor else []

    def _remember(self, tensor: Any, producer: tuple[str, str, int]) -> None:
        import weakref

        found = self._made.get(id(tensor))
        if found is not None and found[0]() is tensor:
            found[1].append(producer)
            return
        if len(self._made) > 50_000:  # forget tensors that no longer exist
            self._made = {k: v for k, v in self._made.items() if v[0]() is not None}
        self._made[id(tensor)] = (weakref.ref(tensor), [producer])

    def _hook(self, component: str, name: str):
        import torch

        key = (component, name)

        def hook(_module, args, kwargs, output):
            self._order.setdefault(key, len(self._order))
            found = _max_abs(args) + _max_abs(kwargs)
            if found:
                peak = torch.stack(found).max()
                self._in[key] = peak if key not in self._in else torch.maximum(self._in[key], peak)
            outs = _output_maxima(output)
            old = self._out.get(key)
            if old is None or len(old) != len(outs):
                self._out[key] = outs
            else:
                self._out[key] = [o if n is None else n if o is None else torch.maximum(o, n) for o, n in zip(old, outs)]
            for tensor in _tensors(args) + _tensors(kwargs):
                for owner, producer, position in self._producers(tensor):
                    if owner == component and not _related(producer, name):
                        self._feeds.setdefault(key, set()).add((producer, position))
            for position, item in enumerate(output if isinstance(output, tuple) else (output,)):
                if isinstance(item, torch.Tensor):
                    self._remember(item, (component, name, position))
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def feeds(self) -> dict[str, dict[str, list[list[Any]]]]:
        """``{component: {module: [[producer, output position], ...]}}``: whose outputs each module received."""
        table: dict[str, dict[str, list[list[Any]]]] = {}
        for (component, name), producers in sorted(self._feeds.items()):
            table.setdefault(component, {})[name] = [[p, i] for p, i in sorted(producers)]
        return table

    def result(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{component: {module: {"in": x, "out": y, "outs": [...], "headroom": 65504 / max}}}``, largest first."""
        table: dict[str, dict[str, dict[str, Any]]] = {}
        for key in sorted(set(self._in) | set(self._out)):
            component, name = key
            inp = float(self._in[key]) if key in self._in else 0.0
            outs = [None if o is None else float(o) for o in self._out.get(key, [])]
            out = max((o for o in outs if o is not None), default=0.0)
            peak = max(inp, out)
            table.setdefault(component, {})[name] = {
                "in": inp, "out": out, "outs": outs, "order": self._order.get(key, -1),
                "headroom": round(FP16_MAX / peak, 3) if peak > 0 else None}
        return {c: dict(sorted(rows.items(), key=lambda kv: -max(kv[1]["in"], kv[1]["out"]))) for c, rows in table.items()}


def _related(a: str, b: str) -> bool:
    """One module contains the other (or they are the same)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


@dataclass(frozen=True)
class Island:
    """One module that runs in FP32 inside an FP16/FP8 graph."""

    module: str
    max_abs: float
    why: str
    fp32_outputs: tuple[int, ...] = ()  # output positions that stay FP32 (past the margin themselves)

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "max_abs": self.max_abs, "why": self.why,
                "fp32_outputs": list(self.fp32_outputs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Island:
        return cls(data["module"], float(data["max_abs"]), data["why"], tuple(data.get("fp32_outputs", ())))


def island_unit(module: str, units: tuple[str, ...] = ()) -> str:
    """The smallest enclosing module of ``module`` that a spec names as an island unit (regexes over the
    dotted name: ``transformer_blocks\\.\\d+``, T5's ``encoder\\.block\\.\\d+\\.layer\\.\\d+``); a module outside
    every unit (``encoder.final_layer_norm``) is its own unit."""
    parts = module.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if any(re.fullmatch(u, prefix) for u in units):
            return prefix
    return module


def _holds_units(name: str, names: set[str], units: tuple[str, ...]) -> bool:
    """``name`` contains island units (T5's block, a transformer's block list): its units are the islands."""
    return any(n.startswith(name + ".") and any(re.fullmatch(u, n) for u in units) for n in names)


def plan_islands(census: dict[str, dict[str, Any]], module_names: list[str], *, margin: float,
                 upcast: tuple[str, ...] = (), units: tuple[str, ...] = (),
                 feeds: dict[str, list[list[Any]]] | None = None) -> list[Island]:
    """Islands of one component: the recipe's ``upcast`` patterns present in the model, plus every unit
    holding a module whose input or output max |x| exceeds ``margin`` in the census. A unit whose own
    output exceeds the margin keeps that output FP32 (its consumer's input exceeds too, so it is an island),
    and so does an output that another island receives (``feeds``, the census's data flow): two islands in a row
    are one FP32 stream, never rounded through FP16 between them.

    Right by construction at every boundary: a module that *receives* a value past the margin is an island
    whole — not just the hot child the census names inside it — because its forward hands that input to code
    between its children (``AdaLayerNormContinuous`` casts its conditioning to the input's dtype before its
    Linear), unless it is a container of units (T5's block), whose units are the islands. Islands never nest."""
    names = set(module_names)
    chosen: dict[str, tuple[float, str]] = {}
    for pattern in upcast:
        for name in sorted(n for n in names if fnmatch.fnmatchcase(n, pattern)):
            if name not in chosen and not any(name.startswith(c + ".") for c in chosen):
                peak = max(census.get(name, {}).get("in", 0.0), census.get(name, {}).get("out", 0.0))
                chosen[name] = (peak, f"recipe: upcast '{pattern}' (known FP16 overflow site)")
    hot = [n for n, row in census.items() if n and max(row["in"], row["out"]) > margin]
    for name in hot:
        row = census[name]
        peak = max(row["in"], row["out"])
        unit = island_unit(name, units)
        if unit == name and any(h.startswith(name + ".") for h in hot) and \
                (row["in"] <= margin or _holds_units(name, names, units)):
            continue  # a container whose hot values come from a child (or that holds units): the child's unit goes
        if unit not in names or any(unit == c or unit.startswith(c + ".") for c in chosen):
            continue
        where = "input" if row["in"] >= row["out"] else "output"
        chosen[unit] = (peak, f"census: {name} {where} max |x| {peak:.4g} > margin {margin:g} (FP16 max {FP16_MAX:g})")
    # a container chosen after one of its children (census order is by value): the container alone is the island
    chosen = {u: v for u, v in chosen.items() if not any(u.startswith(c + ".") for c in chosen if c != u)}
    into_islands: dict[str, dict[int, str]] = {}  # island -> output position -> the island receiving it
    for consumer, producers in (feeds or {}).items():
        receiving = next((c for c in chosen if consumer == c or consumer.startswith(c + ".")), None)
        for producer, position in producers if receiving is not None else ():
            if producer in chosen and producer != receiving:
                into_islands.setdefault(producer, {}).setdefault(int(position), receiving)
    islands = []
    for unit, (peak, why) in chosen.items():
        outs = census.get(unit, {}).get("outs", [])
        keep = {i for i, o in enumerate(outs) if o is not None and o > margin}
        streams = {i: c for i, c in into_islands.get(unit, {}).items() if i not in keep}
        if streams:
            why += "; " + ", ".join(f"output {i} stays FP32 into {c}" for i, c in sorted(streams.items()))
        islands.append(Island(unit, peak, why, tuple(sorted(keep | set(streams)))))
    return sorted(islands, key=lambda i: natural_key(i.module))


def natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def hottest_module(census: dict[str, dict[str, Any]], islands: list[Island]) -> tuple[str, float] | None:
    """The module with the largest activation outside every island: what to name when FP16/FP8 fails."""
    inside = [i.module for i in islands]
    for name, row in census.items():
        if name and not any(name == m or name.startswith(m + ".") for m in inside):
            return name, max(row["in"], row["out"])
    return None


def _cast_floats(value: Any, dtype: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def island_state(network: Any, islands: list[Island]) -> dict[str, Any]:
    """FP32 copies of every parameter and buffer inside ``islands`` (full names in ``network``), taken while the
    network still has its FP32 weights: what ``fp32_islands`` runs them with after the network is cast to FP16."""
    inside = tuple(i.module + "." for i in islands)
    tensors = {**dict(network.named_parameters()), **dict(network.named_buffers())}
    return {name: t.detach().float().clone() for name, t in tensors.items() if name.startswith(inside)}


def _match_weights(module: Any, args: Any, kwargs: Any) -> Any:
    """Forward pre-hook: floating inputs cast to the dtype of the module's own weights."""
    weight = next(module.parameters(recurse=False), None)
    if weight is None or not weight.is_floating_point():
        return None
    return _cast_floats(args, weight.dtype), _cast_floats(kwargs, weight.dtype)


def _upcast(island: str, root: Any, weights: dict[str, Any], saved: list[tuple[Any, str, str, Any]]) -> None:
    """Every floating parameter and buffer under ``root`` (the module named ``island``) replaced by FP32: the
    original from ``weights`` where it has one, else the tensor upcast. Each replaced tensor goes to ``saved``
    first, so the caller puts back everything replaced, even after an error half-way."""
    import torch

    for prefix, module in root.named_modules():
        full = f"{island}.{prefix}" if prefix else island
        for kind in ("_parameters", "_buffers"):
            for name, tensor in list(getattr(module, kind).items()):
                if tensor is None or not tensor.is_floating_point():
                    continue
                saved.append((module, kind, name, tensor))
                source = weights.get(f"{full}.{name}")
                value = source.to(tensor.device, torch.float32) if source is not None else tensor.detach().float()
                getattr(module, kind)[name] = torch.nn.Parameter(value, requires_grad=False) \
                    if kind == "_parameters" else value


@contextlib.contextmanager
def fp32_islands(network: Any, islands: list[Island], low_dtype: Any,
                 weights: dict[str, Any] | None = None) -> Iterator[None]:
    """Run ``islands`` of ``network`` (whose other weights are in ``low_dtype``) in FP32: inputs cast to FP32,
    outputs cast back to ``low_dtype`` except positions in ``fp32_outputs``, and the island's parameters and buffers
    FP32 — the FP32 originals from ``weights`` (``island_state``, or read from the model's files) where given, else
    the low-precision ones upcast (FP16-rounded). Everything is put back as it was on exit (the very tensors, so
    the next use of the context still finds the FP32 originals in ``weights``). Traced by ``torch.onnx.export``
    as Casts and FP32 initializers.

    Outside the islands, a module with weights that is handed a tensor of another dtype (an island's FP32
    output reaching it through code between modules) gets it cast to its weights' dtype: by the census that
    value is inside FP16 range (else the module would be an island), so the cast is exact enough, and a boundary
    the plan did not foresee is a measured FP16 error, never a crash. The cast is traced only where it happens."""
    import torch

    modules = dict(network.named_modules())
    handles = []
    inside = [i.module for i in islands]
    saved: list[tuple[Any, str, str, Any]] = []  # (module, "_parameters" | "_buffers", name, original tensor)

    try:
        if islands:
            for name, module in modules.items():
                if name and not any(name == m or name.startswith(m + ".") for m in inside) and \
                        next(module.parameters(recurse=False), None) is not None:
                    handles.append(module.register_forward_pre_hook(_match_weights, with_kwargs=True))
        for island in islands:
            module = modules[island.module]
            _upcast(island.module, module, weights or {}, saved)
            keep = set(island.fp32_outputs)

            def pre(_m, args, kwargs):
                return _cast_floats(args, torch.float32), _cast_floats(kwargs, torch.float32)

            def post(_m, _args, output, keep=keep):
                if isinstance(output, tuple):
                    return tuple(o if i in keep else _cast_floats(o, low_dtype) for i, o in enumerate(output))
                return output if 0 in keep else _cast_floats(output, low_dtype)

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, kind, name, tensor in reversed(saved):
            getattr(module, kind)[name] = tensor
