"""Engine parts: one component's ONNX cut into consecutive graphs that build one at a time.

A TensorRT(-RTX) build peaks at about 2.7x its weights (the parser's mapped ONNX, the builder's copy, the
whole plan in memory; docs/BENCHMARKS.md "Run 8"), so SD3.5-Large's FP16 transformer needs a 40 GiB build box.
Cut into N parts, each part's builder holds about 1/N of that: the memory a build needs is what a box has,
not what the largest network has. At run time the parts run back to back on one stream (``runners.ChainRunner``);
what crosses a cut is a handful of activations (the residual streams and the conditioning at a block boundary).

The cut is planned on the graph alone (``plan_parts``, a pure function of the ONNX graph and the shapes of
its optimisation profile), never on model knowledge:
- nodes whose inputs are all constants (weights, their DequantizeLinear, shared Identity) go with the part
  that uses them, so weights sit where they are used and are never copied;
- a cut is allowed where every tensor crossing it is floating point with shapes ONNX shape inference
  resolves at the profile's min/opt/max (those shapes become the next part's profile); integer shape
  arithmetic that crosses (``height // patch`` computed from an input) is recomputed in the later part;
- among allowed cuts near an equal share of the weights, the one with the fewest crossing tensors wins.
Parts reference the component's own external-data file (a hard link beside them, or a symbolic one across file
systems), so cutting copies no weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.core.errors import BuildError, InvalidInputError

if TYPE_CHECKING:
    import onnx

# ONNX element types a cut may carry between parts (the engine I/O types runners.ENGINE_IO_DTYPES feeds);
# integers only where they are values (token ids), never shape arithmetic, which is recomputed.
CARRIED_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool"}
# A tensor computed from the graph inputs alone, cheaply (shape arithmetic, position ids, CLIP's causal mask,
# T5's relative position bias) is recomputed by a later part instead of crossing, if it costs at most:
RECOMPUTE_NODES = 256
RECOMPUTE_WEIGHT_BYTES = 1 << 20
HEAVY_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "MatMulInteger", "QLinearMatMul"}
CANDIDATES = 400  # cuts tried per boundary, best first


# Memory a build needs per byte of engine weights. Peak RSS is ~2.7-2.8x (TensorRT-RTX 1.7, child process, SD3.5-Large
# FP8/FP16 transformer and FP16 T5 on the H100 host; SD3.5-Medium FP16 transformer 2.81x on the CPU box), but about
# 1x of that is file-backed: the ONNX weights the parser maps, clean page cache the kernel can drop and re-read,
# which MemAvailable already counts as available. The anonymous part measured 1.80x (Medium FP16 transformer,
# bench/results/2026-11-22-cpu-run7): the builder's copy of the weights it converts, then the whole plan.
# The host check asks for 2.0x plus 1 GiB for the libraries; a --max-build-memory budget (peak RSS) for 2.8x + 1 GiB.
BUILDER_MEMORY_FACTOR = 2.0
PEAK_RSS_FACTOR = 2.8
BUILDER_BASE_GIB = 1.0
MAX_PARTS = 8


@dataclass(frozen=True)
class PartsChoice:
    """How many parts one component's engine is built in (``sd35trt.producers.parts``), and why."""

    count: int
    reason: str


def builder_need(weight_bytes: int, factor: float) -> int:
    return int(weight_bytes * factor) + int(BUILDER_BASE_GIB * 2**30)


def plan_part_counts(weights: dict[str, int], explicit: dict[str, int], budget_gib: float | None,
                     available: int | None, memory_check: bool) -> dict[str, PartsChoice]:
    """Parts per component: ``--parts`` where given; else the fewest that keep each builder's estimated peak RSS
    (PEAK_RSS_FACTOR x its weights + 1 GiB) within ``--max-build-memory``; else, where this host's memory
    (MemAvailable + swap) cannot hold a whole build (BUILDER_MEMORY_FACTOR), the fewest that fit it, so a small
    build box builds Large instead of refusing; else one. A component that fits in no count gets one, and
    ``check_memory`` then refuses it in one line."""
    choices = {}
    for name, size in weights.items():
        if name in explicit:
            choices[name] = PartsChoice(explicit[name], "--parts")
            continue
        if budget_gib is not None:
            limit, factor, why = int(budget_gib * 2**30), PEAK_RSS_FACTOR, f"--max-build-memory {budget_gib:g} GiB"
        elif memory_check and available is not None:
            limit, factor, why = available, BUILDER_MEMORY_FACTOR, f"this host's {available / 2**30:.1f} GiB available"
        else:
            choices[name] = PartsChoice(1, "whole")
            continue
        count = next((k for k in range(1, MAX_PARTS + 1) if builder_need(size // k, factor) <= limit), None)
        if count is None or count == 1:
            choices[name] = PartsChoice(1, "whole" if count else f"does not fit {why} even in {MAX_PARTS} parts")
        else:
            choices[name] = PartsChoice(count, f"{why}: about {builder_need(size, factor) / 2**30:.1f} GiB whole, "
                                               f"{builder_need(size // count, factor) / 2**30:.1f} GiB per part")
    return choices


def available_memory() -> int | None:
    """MemAvailable + SwapFree from /proc/meminfo (bytes), or None where that cannot be read."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(onnx_bytes: int, what: str, available: int | None) -> None:
    """One line before a build whose builder would not fit in this host's memory (the OOM killer would end it
    minutes later, the previous bundle untouched, but with no time saved). ``available`` is MemAvailable +
    SwapFree; ``BUILDER_MEMORY_FACTOR`` says what is counted."""
    needed = builder_need(onnx_bytes, BUILDER_MEMORY_FACTOR)
    if available is not None and needed > available:
        raise InvalidInputError(f"not enough memory to build {what}: the builder needs about {needed / 2**30:.1f} GiB "
                                f"({BUILDER_MEMORY_FACTOR}x its {onnx_bytes / 2**30:.1f} GiB of weights, measured, besides "
                                f"the mapped ONNX itself), "
                                f"{available / 2**30:.1f} GiB available",
                                hint=f"build it in parts (--parts NAME=N, up to {MAX_PARTS}), free memory, or build on a "
                                     "larger machine; --no-memory-check tries anyway (VMs whose memory grows on demand)")


@dataclass(frozen=True)
class PartPlan:
    """One part: which tensors it takes and gives, its weights, its optimisation profile, and the span of the
    source graph's compute nodes it runs (positions in graph order; meaningful for that graph only)."""

    index: int
    count: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int
    profile: dict[str, list[list[int]]]
    span: tuple[int, int] = (0, 0)


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an initializer, inline or external, without reading its data."""
    import onnx
    from onnx import helper

    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type != \
        onnx.TensorProto.STRING else 0


class _Graph:
    """Index of one ONNX graph: constant nodes, compute nodes in order, producers, consumers, weights."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.inits]
        self.graph_outputs = [o.name for o in graph.output]
        const: set[str] = set(self.inits)
        self.const_producer: dict[str, int] = {}
        self.compute: list[int] = []  # node indices of compute nodes, in graph order
        self.producer: dict[str, int] = {}  # tensor -> position in self.compute
        for index, node in enumerate(self.nodes):
            if all(not name or name in const for name in node.input):
                for out in node.output:
                    const.add(out)
                    self.const_producer[out] = index
            else:
                for out in node.output:
                    self.producer[out] = len(self.compute)
                self.compute.append(index)
        self.const = const
        self._closures: dict[str, set[int] | None] = {}
        self.last_use: dict[str, int] = {}
        self.weights = [0] * len(self.compute)  # initializer bytes first used by each compute node
        seen: set[str] = set()
        for position, index in enumerate(self.compute):
            for name in self.nodes[index].input:
                if name in self.producer:
                    self.last_use[name] = position
                elif name in const:
                    fresh = [i for i in self.const_inits(name) if i not in seen]
                    seen.update(fresh)
                    self.weights[position] += sum(tensor_bytes(self.inits[i]) for i in fresh)
        for name in self.graph_outputs:
            if name in self.producer:
                self.last_use[name] = len(self.compute)

    def const_nodes(self, name: str) -> set[int]:
        """Node indices of the constant subgraph producing ``name``."""
        found: set[int] = set()
        stack = [name]
        while stack:
            tensor = stack.pop()
            index = self.const_producer.get(tensor)
            if index is None or index in found:
                continue
            found.add(index)
            stack.extend(t for t in self.nodes[index].input if t)
        return found

    def const_inits(self, name: str) -> set[str]:
        if name in self.inits:
            return {name}
        return {t for i in self.const_nodes(name) for t in self.nodes[i].input if t in self.inits}

    def crossing(self, cut: int) -> list[str]:
        """Compute tensors made before position ``cut`` and used at or after it."""
        return [t for t, last in self.last_use.items() if self.producer[t] < cut <= last]

    def recompute_closure(self, tensor: str) -> set[int] | None:
        """Node indices that recompute ``tensor`` from the graph inputs and constants, or None where that costs
        more than RECOMPUTE_NODES / RECOMPUTE_WEIGHT_BYTES (a real activation, or an embedding MLP)."""
        if tensor in self._closures:
            return self._closures[tensor]
        found: set[int] = set()
        stack = [tensor]
        while stack and found is not None:
            name = stack.pop()
            if name in self.const or name in self.graph_inputs:  # every part may take any graph input
                continue
            position = self.producer.get(name)
            if position is None or len(found) >= RECOMPUTE_NODES:
                found = None
                break
            index = self.compute[position]
            if index in found:
                continue
            found.add(index)
            node = self.nodes[index]
            if node.op_type in HEAVY_OPS:  # real compute: carried, never done twice
                found = None
                break
            stack.extend(t for t in node.input if t)
        if found is not None:
            weights = {i for n in found for t in self.nodes[n].input if t in self.const for i in self.const_inits(t)}
            if sum(tensor_bytes(self.inits[i]) for i in weights) > RECOMPUTE_WEIGHT_BYTES:
                found = None
        self._closures[tensor] = found
        return found

    def carry(self, tensor: str, types: list[dict]) -> str | None:
        """How a tensor made in an earlier part reaches a later one: ``recompute`` (shape-derived),
        ``input`` (an activation whose shapes resolve at the profile's min/opt/max), or None (it cannot)."""
        if self.recompute_closure(tensor) is not None:
            return "recompute"
        kinds = [t.get(tensor) for t in types]
        if all(k is not None and k[0] in CARRIED_TYPES and None not in k[1] for k in kinds):
            return "input"
        return None

    def closure_inputs(self, tensor: str) -> list[str]:
        """Graph inputs a recomputed tensor reads."""
        return sorted({t for i in self.recompute_closure(tensor) or set() for t in self.nodes[i].input
                       if t in self.graph_inputs})


def _infer_types(model: onnx.ModelProto, shapes: dict[str, list[int]],
                 base_dir: Path | None = None) -> dict[str, tuple[int, tuple[int | None, ...]]]:
    """Element type and concrete shape (None where unresolved) of every tensor, with the graph inputs fixed to
    ``shapes``: onnxruntime's symbolic shape inference (it folds the shape arithmetic ONNX's own inference leaves
    open, such as T5's relative position bias built from Range), over ONNX's own where it cannot run. Weights
    over 1 MiB are not read: they stand in as graph inputs of their type and shape."""
    import onnx
    from onnx import helper, shape_inference

    from sd35trt.core.onnx_utils import read_external

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for value in probe.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    found: dict[str, tuple[int, tuple[int | None, ...]]] = {}

    def collect(values: Iterable[onnx.ValueInfoProto]) -> None:
        for value in values:
            tensor_type = value.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
            if value.name not in found or None in found[value.name][1]:
                found[value.name] = (tensor_type.elem_type, dims if tensor_type.HasField("shape") else (None,))

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        symbolic = onnx.ModelProto()
        symbolic.CopyFrom(probe)
        weights = []
        for tensor in symbolic.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor_bytes(tensor) > RECOMPUTE_WEIGHT_BYTES:
                symbolic.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
            else:
                weights.append(tensor)
        del symbolic.graph.initializer[:]
        symbolic.graph.initializer.extend(weights)  # copies: read the small ones' data into the graph's own
        small = [*symbolic.graph.initializer, *(a.t for n in symbolic.graph.node for a in n.attribute if a.HasField("t"))]
        for tensor in small:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                if base_dir is None:
                    raise ValueError("external tensor without a base directory")
                tensor.raw_data = read_external(tensor, base_dir)
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
        inferred = SymbolicShapeInference.infer_shapes(symbolic, auto_merge=True)
        collect([*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input])
    except Exception as exc:  # noqa: BLE001 - ONNX's own inference below still types most tensors
        from sd35trt.core import log

        log.info(f"parts: onnxruntime's symbolic shape inference failed ({str(exc)[:160]}); using ONNX's own")
    inferred = shape_inference.infer_shapes(probe, data_prop=True)
    collect([*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input])
    return found


def plan_parts(model: onnx.ModelProto, count: int, profile: dict[str, list[list[int]]],
               base_dir: Path | None = None) -> list[PartPlan]:
    """Where to cut ``model`` into ``count`` parts (see the module docstring); raises BuildError when a
    graph has no allowed cut near an equal share of its weights."""
    return _plan(_Graph(model), count, _profile_types(model, profile, base_dir))


def _profile_types(model: onnx.ModelProto, profile: dict[str, list[list[int]]],
                   base_dir: Path | None) -> list[dict[str, tuple[int, tuple[int | None, ...]]]]:
    """``_infer_types`` at the profile's min, opt and max shapes."""
    return [_infer_types(model, {name: shape[k] for name, shape in profile.items()}, base_dir) for k in range(3)]


def _plan(graph: _Graph, count: int, types: list[dict]) -> list[PartPlan]:
    total = sum(graph.weights)
    cumulative = [0]
    for weight in graph.weights:
        cumulative.append(cumulative[-1] + weight)
    width = len(graph.compute)
    live = [0] * (width + 2)  # how many tensors cross each cut position (difference array)
    for tensor, last in graph.last_use.items():
        live[graph.producer[tensor] + 1] += 1
        live[last + 1] -= 1
    for k in range(1, width + 1):
        live[k] += live[k - 1]

    cuts: list[int] = []
    share = total / count
    for part in range(1, count):
        target = share * part
        lower = cuts[-1] if cuts else 0
        # near an equal share of the weights first (within 5% of a share counts as equal), then the fewest bytes
        # crossing at the profile's opt shape: a block boundary (residual streams) over the inside of an MLP
        nearest = sorted(range(lower + 1, width), key=lambda c: abs(cumulative[c] - target) / share + 0.02 * live[c])
        candidates = sorted(nearest[:CANDIDATES], key=lambda c: (round(abs(cumulative[c] - target) / share / 0.05),
                                                                 _crossing_bytes(graph, c, types[1])))
        chosen = next((c for c in candidates if _cut_problem(graph, c, types, lower) is None), None)
        if chosen is None:
            why = _cut_problem(graph, candidates[0], types, lower) if candidates else None
            raise BuildError(f"cannot cut this graph into {count} parts of about equal weights"
                             f"{': ' + why if why else ''}",
                             hint="build it in fewer parts (--parts, --max-build-memory)")
        cuts.append(chosen)
    return _assemble(graph, cuts, types)


def _crossing_bytes(graph: _Graph, cut: int, types: dict) -> int:
    """Bytes of the tensors carried across ``cut`` (recomputed ones are free; unknown ones count as huge)."""
    import numpy as np
    from onnx import helper

    total = 0
    for tensor in graph.crossing(cut):
        if graph.recompute_closure(tensor) is not None:
            continue
        elem, dims = types.get(tensor, (0, (None,)))
        if not elem or None in dims:
            return 1 << 62
        total += int(np.prod(dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(elem).itemsize
    return total


def _cut_problem(graph: _Graph, cut: int, types: list[dict], previous: int = 0) -> str | None:
    """Why no part may end at ``cut`` (None when one may): a crossing tensor that can neither be carried nor
    recomputed, or a part since the ``previous`` cut that would hand nothing on (all of it recomputed later)."""
    carried = False
    for tensor in graph.crossing(cut):
        how = graph.carry(tensor, types)
        if how is None:
            return f"tensor {tensor} would cross it and is neither of known shape nor cheap to recompute"
        carried = carried or (how == "input" and graph.producer[tensor] >= previous)
    return None if carried else "the part before it would hand nothing on"


def _assemble(graph: _Graph, cuts: list[int], types: list[dict]) -> list[PartPlan]:
    bounds = [0, *cuts, len(graph.compute)]
    count = len(bounds) - 1
    needs: list[list[str]] = []
    for part in range(count):
        start, stop = bounds[part], bounds[part + 1]
        made = {o for p in range(start, stop) for o in graph.nodes[graph.compute[p]].output}
        taken = []
        for p in range(start, stop):
            for name in graph.nodes[graph.compute[p]].input:
                if name and name not in made and name not in graph.const and name not in taken:
                    taken.append(name)
        needs.append(taken)
    plans = []
    for part in range(count):
        start, stop = bounds[part], bounds[part + 1]
        inputs = [n for n in needs[part] if n in graph.graph_inputs or graph.carry(n, types) == "input"]
        recomputed = [n for n in needs[part] if n not in inputs]
        inputs = list(dict.fromkeys([*inputs, *(i for n in recomputed for i in graph.closure_inputs(n))]))
        outputs = [o for o in graph.graph_outputs if graph.producer.get(o, -1) in range(start, stop)]
        outputs = list(dict.fromkeys([*outputs, *(n for later in needs[part + 1:] for n in later
                                                  if graph.producer.get(n, -1) in range(start, stop)
                                                  and graph.carry(n, types) == "input")]))
        profile = {n: [list(t[n][1]) for t in types] for n in inputs}
        weight = sum(graph.weights[start:stop])
        plans.append(PartPlan(part, count, tuple(inputs), tuple(outputs), weight, profile, (start, stop)))
    return plans


def part_model(graph: _Graph, plan: PartPlan, types: dict[str, tuple[int, tuple]]) -> onnx.ModelProto:
    """The ONNX graph of one part: its compute nodes, the constant nodes and initializers they use (external
    data references unchanged), and the shape arithmetic it recomputes; inputs and outputs as planned."""
    from onnx import helper

    start, stop = plan.span
    keep = {graph.compute[p] for p in range(start, stop)}
    made_here = {o for i in keep for o in graph.nodes[i].output}
    for index in list(keep):
        for name in graph.nodes[index].input:
            if name and name not in made_here and name not in graph.const and name not in plan.inputs:
                keep |= graph.recompute_closure(name) or set()
    for index in list(keep):  # the constants of every kept node, recomputed ones included
        for name in graph.nodes[index].input:
            if name in graph.const:
                keep |= graph.const_nodes(name)
    nodes = [graph.nodes[i] for i in sorted(keep)]  # graph order is a topological order
    used = {t for n in nodes for t in n.input}
    initializers = [tensor for name, tensor in graph.inits.items() if name in used]
    declared = {v.name: v for v in [*graph.model.graph.input, *graph.model.graph.output]}

    def value(name: str, output: bool) -> onnx.ValueInfoProto:
        if name in declared:
            return declared[name]
        if output:  # sizes left symbolic: a fixed shape here would be folded into the part's Shape nodes
            return helper.make_tensor_value_info(name, types[name][0],
                                                 [f"{name}_d{k}" for k in range(len(types[name][1]))])
        shapes = plan.profile[name]
        dims = [low if low == high else f"{name}_d{k}" for k, (low, high) in enumerate(zip(shapes[0], shapes[-1]))]
        return helper.make_tensor_value_info(name, types[name][0], dims)

    body = helper.make_graph(nodes, f"{graph.model.graph.name}_part{plan.index + 1}of{plan.count}",
                             [value(n, False) for n in plan.inputs], [value(n, True) for n in plan.outputs],
                             initializers)
    part = helper.make_model(body, opset_imports=list(graph.model.opset_import), ir_version=graph.model.ir_version,
                             producer_name="sd35trt.producers.parts")
    part.functions.extend(graph.model.functions)
    return part


def write_parts(onnx_path: Path, count: int, profile: dict[str, list[list[int]]], out_dir: Path) -> list[tuple[Path, PartPlan]]:
    """Cut ``onnx_path`` into ``count`` part ONNX files under ``out_dir`` (graph only: each links to the
    component's external-data file), and return them with their plans."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph, types = _Graph(model), _profile_types(model, profile, onnx_path.parent)
    plans = _plan(graph, count, types)
    out_dir.mkdir(parents=True, exist_ok=True)
    for data in _data_files(model):
        link, target = out_dir / data, (onnx_path.parent / data).resolve()
        if not link.exists():
            try:  # a hard link: readers that refuse external data resolving outside the model's folder (onnxruntime
                os.link(target, link)  # 1.31) accept it; no byte is copied
            except OSError:  # another file system: a symbolic link (TensorRT's parser follows it)
                link.symlink_to(target)
    written = []
    for plan in plans:
        path = out_dir / f"part{plan.index + 1}of{plan.count}.onnx"
        onnx.save(part_model(graph, plan, types[1]), str(path))
        written.append((path, plan))
    return written


def _data_files(model: onnx.ModelProto) -> Iterable[str]:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    return sorted({ExternalDataInfo(t).location for t in _get_all_tensors(model)
                   if t.data_location == onnx.TensorProto.EXTERNAL})
