"""fxfuse as a ``torch.compile`` backend: ``torch.compile(model, backend="fxfuse")``.

Dynamo hands a backend a Torch-level graph (``F.linear`` calls, Python
operators, parameters as inputs, no fake values on the nodes) together with
the call's real inputs and, where a dim is dynamic, its symbolic size. The
backend

1. re-traces the graph to ATen with ``make_fx(pre_dispatch=True)`` inside
   Dynamo's own fake mode: the pre-dispatch form torch.export gives
   ``optimize()`` (``aten.linear``, SDPA, softmax and SiLU not decomposed,
   nothing functionalized), with a fake value on every node and Dynamo's
   symbolic sizes, so one graph serves every size of a dynamic dim and any
   guard a pass adds goes into Dynamo's guards. A graph with tensor-subclass
   inputs (the DTensor parameters of a tensor-parallel model) is traced below
   the subclass instead, on the inner tensors, without gradients: the local
   computation of one rank, its communication as functional collectives that
   every fused op stays on one side of (``docs/distributed.md``);
2. runs the pass pipeline as ``optimize()`` does, each pass validated on the
   call's real inputs and on probes derived from them (padded masks, redrawn
   ids), with the inputs the graph writes to (a static KV cache) copied for
   every run and the random seed fixed, so dropout draws alike;
3. lowers the fused graph: ``"eager"`` (the eager back end: oneDNN linears
   with fused epilogues when no gradient is needed, the dialect ops'
   implementations), ``"inductor"`` (Inductor generates the loops of the
   norms, rotary embeddings and activations from their reference forms and
   everything around them, and calls SDPA for the attention) or ``"triton"``
   (fxfuse's kernels, on CUDA). ``"auto"``, the default, takes Triton on
   CUDA, and on the CPU the eager back end, except for a model's decode step
   (see :func:`~fxfuse.codegen.inductor.decode_step`), where which is faster
   depends on the machine (on the project's Intel Xeon the eager back end's
   per-op dispatch made its step 1.25x Inductor's; on its AMD EPYC, where
   oneDNN's one-row GEMMs beat the ATen GEMMs Inductor calls, 0.65-0.73x).
   auto times the eager program on the call's inputs against the step's
   GEMMs alone as Inductor runs them: where it is no slower, Inductor cannot
   win and is not compiled; otherwise Inductor compiles the step and the
   faster of the two is kept.

A graph the backend cannot handle runs as Dynamo gave it: the reason is
logged on the ``fxfuse`` logger and kept in that graph's report, and the
user's ``torch.compile`` call never fails because of fxfuse (under
``fxfuse.errors.strict()``, as in the tests, the error propagates). Each
compiled graph's :class:`~fxfuse.report.Report` is kept on the backend
(``Backend.reports``); :func:`last_report` gives the most recent one.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Literal, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from fxfuse.codegen import lower as lower_program
from fxfuse.codegen import triton_available
from fxfuse.codegen.inductor import AtenGemms, compile_with_inductor, decode_step, gemm_weights, step_bytes
from fxfuse.codegen.roofline import Floor, read_bandwidth
from fxfuse.cpu_kernels import arena
from fxfuse.cpu_kernels import build as cpu_kernels
from fxfuse.errors import InputError, is_strict
from fxfuse.ir.inputs import Probe, derive_probes
from fxfuse.ir.numerics import Float64Replay, compare
from fxfuse.passes import DEFAULT_PIPELINE, PassManager, resolve
from fxfuse.passes.manager import PassResult, validate_on
from fxfuse.report import Report, count_dialect_ops

log = logging.getLogger("fxfuse")

LOWERINGS = ("auto", "eager", "inductor", "triton")
_LAST: list[Report] = []  # the most recent report of any backend, for last_report()


class Backend:
    """A ``torch.compile`` backend that fuses each graph Dynamo hands it; pass it as ``backend=``.

    ``passes`` names the pipeline (default: ``fxfuse.passes.DEFAULT_PIPELINE``);
    ``lower`` is "eager", "inductor", "triton", or "auto" (Triton for CUDA
    graphs when Triton is installed; on the CPU Inductor for a decode step,
    :func:`~fxfuse.codegen.inductor.decode_step`, falling back to eager if Inductor fails, and eager
    for the other graphs); ``validate`` checks every
    pass on the call's inputs and probes (a pass that fails is rolled back).
    ``reports`` holds one :class:`~fxfuse.report.Report` per compiled graph
    and ``graph_modules`` each fused graph (None where a graph ran unfused).
    """

    def __init__(self, passes: Sequence[str] | None = None,
                 lower: Literal["auto", "eager", "inductor", "triton"] = "auto", validate: bool = True) -> None:
        if lower not in LOWERINGS:
            raise InputError(f"lower must be one of {LOWERINGS}, got {lower!r}")
        self.pipeline = resolve(list(passes) if passes is not None else list(DEFAULT_PIPELINE))
        self.lower = lower
        self.validate = validate
        self.reports: list[Report] = []
        self.graph_modules: list[fx.GraphModule | None] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        report = Report(model=_graph_name(), backend=self.lower, passes=[], ops={}, capture_seconds=0.0)
        self.reports.append(report)
        self.graph_modules.append(None)
        slot = len(self.graph_modules) - 1
        _LAST[:] = [report]
        try:
            program, self.graph_modules[slot] = self._compile(gm, example_inputs, report)
            return program
        except Exception as e:
            from torch._dynamo.exc import RestartAnalysis

            if is_strict() or isinstance(e, RestartAnalysis):  # Dynamo's own signal to trace the frame again
                raise
            reason = _first_line(e, 300)
            report.notes.append(f"ran unfused: {reason}")
            log.warning("fxfuse: graph %s runs unfused (%s)", report.model, reason)
            return gm.forward

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any],
                 report: Report) -> tuple[Callable, fx.GraphModule]:
        """The program to run for Dynamo's graph ``gm``, and the fused graph."""
        start = time.perf_counter()
        specialized, floats = specialize_floats(gm, example_inputs)
        if floats:
            report.notes.append(f"{len(floats)} float input(s) Dynamo passed as tensors (eps, scales: "
                                "torch.compile(dynamic=True)) are taken as constants; a call with other values "
                                "runs the unfused graph")
        aten_gm = to_aten(specialized)
        report.capture_seconds = time.perf_counter() - start
        inputs = Inputs(gm, example_inputs)
        ranks = Ranks(example_inputs)
        cases: list[Probe] = []
        if self.validate:
            reference = inputs.call_dynamo(gm, inputs.real, {})
            outcome = compare(reference, inputs.call(aten_gm, inputs.real, {}))
            if ranks.any(not outcome.ok):
                where = outcome.detail if not outcome.ok else "on another rank"
                raise RuntimeError(f"the ATen graph does not reproduce Dynamo's graph: {where}")
            cases = [Probe("the call's inputs", inputs.real, {}, reference, inputs.float64(gm, inputs.real)),
                     *inputs.probes(gm)]
        lowering = self._lowering(example_inputs, aten_gm, report)
        report.backend = lowering
        # Every validation runs the whole graph: validate the lowered program once, and look for the pass at
        # fault (validating after each, on a fresh graph) only when it fails.
        manager = PassManager(self.pipeline, validate=False, on_failure="skip")
        report.passes = manager.run(aten_gm)
        program, failure = self._lower(aten_gm, lowering, example_inputs, cases, inputs, ranks, report)
        if ranks.together and ranks.any(failure is not None):
            # Finding the pass at fault runs the graph, and its collectives, a number of times that depends on
            # the verdicts: no rank looks for it, so that every rank runs the same collectives.
            raise RuntimeError(f"the fused graph failed validation ({failure or 'on another rank'}); a graph "
                               "with collectives is not searched pass by pass")
        if failure is not None and validate_on(aten_gm, cases, PassResult("fused graph"), inputs.call) is not None:
            aten_gm = to_aten(specialized)
            manager = PassManager(self.pipeline, validate=True, on_failure="skip", call=inputs.call)
            report.passes = manager.run(aten_gm, (cases[0].args, cases[0].kwargs), cases[0].reference,
                                        probes=cases[1:], float64=cases[0].float64)
            program, failure = self._lower(aten_gm, lowering, example_inputs, cases, inputs, ranks, report)
        report.ops = count_dialect_ops(aten_gm)
        if failure is not None:  # the fused graph is right; its lowering is not
            lowering = report.backend  # auto's Inductor may have fallen back to eager
            checked = PassResult(f"codegen-{lowering}", skipped=True, error=failure)
            report.passes.append(checked)
            report.lowered = {}
            report.notes.append(f"the {lowering} lowering is not used: {failure}")
            program = aten_gm
            unproven = validate_on(program, cases, checked, inputs.call)
            if unproven is not None:  # nothing fused is proven right: run Dynamo's graph as it is
                raise RuntimeError(f"the fused graph {unproven[1]}")
            report.max_error, report.validated_on = checked.max_error, checked.validated_on
        if any(is_traceable_wrapper_subclass(x) for x in example_inputs):  # not on every plain call
            program = OnInnerTensors(program)
        return (FloatGuard(program, gm.forward, floats, report.model) if floats else program), aten_gm

    def _lower(self, gm: fx.GraphModule, lowering: str, example_inputs: list[Any], cases: list[Probe],
               inputs: Inputs, ranks: Ranks, report: Report) -> tuple[Callable, str | None]:
        """The lowered program of ``gm`` and, when it differs from the reference on a case, why."""
        program = None
        if lowering == "inductor" and self.lower == "auto" and not ranks.together:
            program, lowering = self._auto_decode_step(gm, example_inputs, inputs, report)
            report.backend = lowering
        elif lowering == "inductor":  # ranks running together choose alike: they keep Inductor, untimed
            program = self._inductor(gm, example_inputs, report)
            if program is None:
                lowering = report.backend = "eager"
        if program is None:
            program = lower_program(gm, lowering)
        report.lowered = getattr(program, "lowered", {})
        if not cases:
            return program, None
        checked = PassResult(f"codegen-{lowering}")
        failure = ranks.validate(program, cases, checked, inputs.call)
        report.max_error, report.validated_on = checked.max_error, checked.validated_on
        return program, None if failure is None else failure[1]

    def _auto_decode_step(self, gm: fx.GraphModule, example_inputs: list[Any], inputs: Inputs,
                          report: Report) -> tuple[Callable, str]:
        """auto's program for a decode step and its lowering: the eager back end's unless Inductor's is faster.

        The eager program is first timed against the step's GEMMs alone as
        Inductor runs them (ATen's): where it is no slower, Inductor's cannot
        be faster and is not compiled. Otherwise Inductor compiles the step,
        and the faster of the two on the call's inputs is kept.
        """
        if not cpu_kernels.available():
            report.notes.append(f"fxfuse's CPU kernels are not built ({cpu_kernels.unavailable_reason()}): the "
                                "decode step's GEMMs run on ATen's and oneDNN's kernels")
        moved = arena.rehome([weight for _, _, weight in gemm_weights(gm, flatten_subclasses(inputs.real))])
        if moved:
            report.notes.append(f"decode step: its GEMM weights ({moved / 2**20:.0f} MiB) moved into one huge-page "
                                "arena, read in the order the step reads them (fxfuse.cpu_kernels.arena)")
        eager = lower_program(gm, "eager")
        gemms = AtenGemms(gm, flatten_subclasses(inputs.real))
        if gemms.calls:
            eager_seconds, gemm_seconds = step_seconds([eager, gemms], inputs)
            if eager_seconds <= gemm_seconds:
                report.notes.append(f"auto lowering: eager, Inductor not compiled: a call took {eager_seconds * 1e3:.2f}"
                                    f" ms, no more than its {len(gemms.calls)} GEMMs alone as Inductor runs them "
                                    f"(ATen's, {gemm_seconds * 1e3:.2f} ms)")
                self._note_floor(gm, eager_seconds, report)
                return eager, "eager"
        inductor = self._inductor(gm, example_inputs, report)
        if inductor is None:
            return eager, "eager"
        inductor_seconds, eager_seconds = step_seconds([inductor, eager], inputs)
        faster = "inductor" if inductor_seconds <= eager_seconds else "eager"
        report.notes.append(f"auto lowering: {faster}, the faster on the call's inputs (a call took "
                            f"{inductor_seconds * 1e3:.2f} ms with Inductor, {eager_seconds * 1e3:.2f} ms with the "
                            "eager back end)")
        self._note_floor(gm, min(inductor_seconds, eager_seconds), report)
        return (inductor, "inductor") if faster == "inductor" else (eager, "eager")

    @staticmethod
    def _note_floor(gm: fx.GraphModule, seconds: float, report: Report) -> None:
        """Write the decode step's time beside its memory floor (its bytes over the measured bandwidth)."""
        report.notes.append(f"decode step: {Floor(seconds, step_bytes(gm), read_bandwidth(), torch.get_num_threads())}")

    def _inductor(self, gm: fx.GraphModule, example_inputs: list[Any], report: Report) -> Callable | None:
        """``gm`` compiled by Inductor; None, with a note, where that fails and auto chose Inductor."""
        try:
            return compile_with_inductor(gm, flatten_subclasses(example_inputs))
        except Exception as e:  # no C++ compiler, an op Inductor cannot lower: auto's choice falls back
            from torch._dynamo.exc import RestartAnalysis

            if self.lower != "auto" or isinstance(e, RestartAnalysis):  # Dynamo's signal, not a failure
                raise
            report.notes.append(f"auto lowering: Inductor failed ({_first_line(e, 200)}); lowered eagerly")
            return None

    def _lowering(self, example_inputs: list[Any], gm: fx.GraphModule, report: Report) -> str:
        if self.lower != "auto":
            return self.lower
        if any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
            return "triton" if triton_available() else "eager"
        step = decode_step(gm)
        if step is None:
            return "eager"
        report.notes.append(f"auto lowering: a decode step ({step}), timed eagerly and, where that can lose, "
                            "with Inductor")
        return "inductor"


def step_seconds(programs: Sequence[Callable], inputs: Inputs, rounds: int = 5) -> list[float]:
    """The median seconds of a call of each of ``programs`` on the call's inputs, after a warm-up call each,
    one call of every program per round: the host's speed drifts alike over all of them."""
    times: list[list[float]] = [[] for _ in programs]
    with torch.no_grad():
        for program in programs:
            inputs.call(program, inputs.real, {})
        for _ in range(rounds):
            for program, seconds in zip(programs, times):
                start = time.perf_counter()
                inputs.call(program, inputs.real, {})
                seconds.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def backend(passes: Sequence[str] | None = None, lower: Literal["auto", "eager", "inductor", "triton"] = "auto",
            validate: bool = True) -> Backend:
    """A ``torch.compile`` backend with options: ``torch.compile(model, backend=fxfuse.backend(lower="inductor"))``.

    ``backend="fxfuse"`` is ``backend()`` with the defaults (registered
    through the ``torch_dynamo_backends`` entry point).
    """
    return Backend(passes, lower, validate)


def last_report() -> Report | None:
    """The report of the graph an fxfuse backend compiled last, or None before any."""
    return _LAST[0] if _LAST else None


def to_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """Dynamo's graph re-traced to pre-dispatch ATen in Dynamo's fake mode, with a fake value on every node."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.proxy_tensor import make_fx

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    fakes = [node.meta.get("example_value") for node in placeholders]
    # The mode of Dynamo's own fake values; it shares Dynamo's shape environment (sizes and guards).
    mode = next((x.fake_mode for x in fakes if isinstance(x, FakeTensor)), None)
    if mode is None:
        raise RuntimeError("Dynamo's graph carries no fake values (example_value) to trace it with")
    if not any(is_traceable_wrapper_subclass(x) for x in fakes):
        with mode:
            return make_fx(gm, pre_dispatch=True)(*fakes)
    # Tensor subclass inputs (DTensor parameters of a tensor-parallel model) cannot be traced before dispatch:
    # trace below them, as AOTAutograd does, on their inner tensors. The subclass's own dispatch then spells
    # out the local computation, and its communication as functional collectives (all_reduce, wait_tensor).
    if torch.is_grad_enabled() and any(is_traceable_wrapper_subclass(x) and x.requires_grad for x in fakes):
        raise RuntimeError("a graph whose tensor-subclass (DTensor) inputs need gradients is not traced below the "
                           "subclass: its collectives would have no gradient formula there")

    def on_inner_tensors(*inner: torch.Tensor) -> Any:
        outputs = gm(*unflatten_subclasses(fakes, inner))
        if any(is_traceable_wrapper_subclass(x) for x in pytree.tree_leaves(outputs)):
            raise RuntimeError("the graph returns a tensor subclass (a DTensor); only plain tensor outputs are "
                               "traced below the subclass")
        return outputs

    with mode:
        return make_fx(on_inner_tensors)(*flatten_subclasses(fakes))


def flatten_subclasses(values: Sequence[Any]) -> list[Any]:
    """``values`` with each traceable tensor subclass (a DTensor) replaced by its inner tensors, in order."""
    flat: list[Any] = []
    for x in values:
        if is_traceable_wrapper_subclass(x):
            attrs, _ = x.__tensor_flatten__()
            flat.extend(flatten_subclasses([getattr(x, attr) for attr in attrs]))
        else:
            flat.append(x)
    return flat


def unflatten_subclasses(like: Sequence[Any], flat: Sequence[Any]) -> list[Any]:
    """The inverse of :func:`flatten_subclasses`: ``flat``'s tensors rewrapped as the subclasses of ``like``."""
    remaining = iter(flat)

    def rebuild(x: Any) -> Any:
        if not is_traceable_wrapper_subclass(x):
            return next(remaining)
        attrs, context = x.__tensor_flatten__()
        inner = {attr: rebuild(getattr(x, attr)) for attr in attrs}
        return type(x).__tensor_unflatten__(inner, context, x.size(), x.stride())

    return [rebuild(x) for x in like]


def specialize_floats(gm: fx.GraphModule, example_inputs: list[Any]) -> tuple[fx.GraphModule, dict[int, float]]:
    """A copy of ``gm`` with the floats Dynamo lifted into 0-d tensor inputs read as constants.

    Under ``dynamic=True`` Dynamo passes Python floats (a norm's eps, an
    attention scale) as 0-d tensors that the graph reads with ``.item()``; the
    fusion rules need them as numbers. Returns the copy and, by input index,
    the values taken (the caller must check them on every call: Dynamo does not
    guard them).
    """
    graph = copy.deepcopy(gm.graph)
    floats: dict[int, float] = {}
    for index, (node, value) in enumerate(zip(graph.find_nodes(op="placeholder"), example_inputs)):
        if not getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False) or not isinstance(value, torch.Tensor):
            continue
        reads = list(node.users)
        if not reads or not all(u.op == "call_method" and u.target == "item" for u in reads):
            continue
        number = value.item()
        for read in reads:
            for user in list(read.users):
                user.args = fx.node.map_arg(user.args, lambda n, r=read: number if n is r else n)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda n, r=read: number if n is r else n)
            graph.erase_node(read)
        floats[index] = number
    return fx.GraphModule(gm, graph), floats


class FloatGuard:
    """Runs ``program`` while the specialized float inputs keep their values, else the unfused graph."""

    def __init__(self, program: Callable, unfused: Callable, floats: dict[int, float], name: str) -> None:
        self.program, self.unfused, self.floats, self.name = program, unfused, floats, name
        self.warned = False

    def __call__(self, *args: Any) -> Any:
        for index, value in self.floats.items():
            if args[index].item() != value:
                if not self.warned:
                    log.warning("fxfuse: %s: input %d is %r, not the %r it was fused with; running it unfused",
                                self.name, index, args[index].item(), value)
                    self.warned = True
                return self.unfused(*args)
        return self.program(*args)


class Ranks:
    """The processes that run one graph and its collectives in lockstep: the device meshes of its DTensor inputs.

    Validation runs the graph, so these ranks must run the same cases and take
    every decision that depends on a verdict alike: ``validate`` runs every
    case even after one fails, and ``any`` makes a verdict the same on all of them.
    """

    def __init__(self, example_inputs: Sequence[Any]) -> None:
        dtensors = []
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor

            dtensors = [x for x in example_inputs if isinstance(x, DTensor)]
        self.groups = list({id(g): g for x in dtensors for g in x.device_mesh.get_all_groups()}.values())
        self.device = dtensors[0].device if dtensors else None

    @property
    def together(self) -> bool:
        """True when the graph is run by several ranks at once."""
        return bool(self.groups)

    def validate(self, program: Callable, cases: Sequence[Probe], result: PassResult,
                 call: Callable) -> tuple[type[Exception], str] | None:
        """:func:`~fxfuse.passes.manager.validate_on`, which stops at the first failing case, except that ranks
        running together run every case; the first failure, or None."""
        if not self.together:
            return validate_on(program, cases, result, call)
        first, worst = None, 0.0
        for case in cases:
            failure = validate_on(program, [case], result, call)  # adds the case to result.validated_on if it passes
            first, worst = first or failure, max(worst, result.max_error)
        result.max_error = worst
        return first

    def any(self, failed: bool) -> bool:
        """True if ``failed`` on any of the ranks (a collective over each group; ``failed`` alone without one)."""
        if not self.groups:
            return failed
        flag = torch.tensor([float(failed)], device=self.device)
        for group in self.groups:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(flag.item())


class OnInnerTensors:
    """Calls an ATen program traced by :func:`to_aten` with Dynamo's arguments: tensor subclasses flattened."""

    def __init__(self, program: Callable) -> None:
        self.program = program

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*flatten_subclasses(args), **kwargs)


class Inputs:
    """The real inputs of one Dynamo graph, and how validation runs a program on them.

    Dynamo passes a backend the call's real tensors, and a symbolic int for
    each dynamic size; ``real`` has the hint of each instead. ``call`` runs an
    ATen program (traced by :func:`to_aten`, so on the inner tensors of any
    tensor-subclass input) and ``call_dynamo`` Dynamo's own graph, both on a
    copy of every input the graph may write to (anything that is not a
    parameter), under a fixed random seed.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> None:
        self.real = tuple(_concrete(x) for x in example_inputs)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.state = [_is_model_state(node, x) for node, x in zip(placeholders, example_inputs)]
        self._replay: Float64Replay | None = None

    def float64(self, gm: fx.GraphModule, args: tuple) -> Callable[[], Any]:
        """Computes Dynamo's graph ``gm`` in float64 on ``args``, when called (for :class:`Probe`)."""
        def run() -> Any:
            if self._replay is None:
                self._replay = Float64Replay(gm)
            return self.call_dynamo(self._replay, args, {})

        return run

    @staticmethod
    def call(program: Callable, args: tuple, kwargs: dict) -> Any:
        return Inputs.call_dynamo(OnInnerTensors(program), args, kwargs)

    @staticmethod
    def call_dynamo(program: Callable, args: tuple, kwargs: dict) -> Any:
        copies = tuple(x.clone() if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter) else x
                       for x in args)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return program(*copies, **kwargs)

    def probes(self, gm: fx.GraphModule) -> list[Probe]:
        """Probes at the call's shapes (padded masks, redrawn ids and features); parameters and buffers kept."""
        user = [i for i, (x, state) in enumerate(zip(self.real, self.state))
                if isinstance(x, torch.Tensor) and not state]
        derived = derive_probes(tuple(self.real[i] for i in user), {}, None)
        probes = []
        for probe in derived:
            args = list(self.real)
            for i, x in zip(user, probe.args):
                args[i] = x
            probe.args = tuple(args)
            with torch.no_grad():
                probe.reference = self.call_dynamo(gm, probe.args, {})
            probe.float64 = self.float64(gm, probe.args)
            probes.append(probe)
        return probes


def _concrete(x: Any) -> Any:
    """A symbolic number's value in this call (its hint); anything else as it is."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        if x.node.hint is None:
            raise RuntimeError(f"the symbolic input {x} has no value in this call to validate with")
        return x.node.hint
    return x


def _is_model_state(node: fx.Node, example: Any) -> bool:
    """True for a parameter or buffer of the model (left as it is in probes)."""
    if isinstance(example, nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = source.name if source is not None else ""
    name = name() if callable(name) else name
    return "_buffers" in name or "_parameters" in name


def _first_line(error: Exception, limit: int) -> str:
    """``error``'s type and the first line of its message, cut at ``limit`` characters, for a report."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:limit]}"


def _graph_name() -> str:
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return f"torch.compile graph {compile_id}" if compile_id is not None else "torch.compile graph"


DEFAULT = Backend()
"""The backend ``backend="fxfuse"`` names (the ``torch_dynamo_backends`` entry point)."""
