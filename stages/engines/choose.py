"""Which engine computes the features: numerics by params or capability, speed by measurement.

1. The precision is fixed first and never by a timing (`choose_precision`): `extract.precision`, or with `auto`
   the hardware alone (CUDA: its AMP dtype; CPU: bf16 only with native bf16 instructions, else float32).
2. The candidates at that precision (`candidate_list`): torch eager contiguous (the baseline), torch
   channels_last and, on the CPU, ONNX Runtime (float32) and OpenVINO (float32, or bf16 where native) when
   listed in `extract.engines`. Eager float32 is always measured: the baseline at float32, the reference
   reported beside the chosen engine at a lower precision.
3. Graph engines need the model exported to ONNX once (cached per weights/layers/size/versions): tried only
   when the graph is already cached, `extract.engines` leaves torch out (the user asked for a graph engine), or
   eager would take longer than EXPORT_TRIAL_MIN_S for the images left.
4. Every candidate runs a warm-up, then timed rounds on real images interleaved across candidates (a load
   spike hits one run, not one candidate); a round whose runs disagree by more than NOISE is repeated, up to
   MAX_ROUNDS. At float32 a candidate whose features differ from eager float32 by more than PARITY_TOLERANCE
   (relative to the layer's largest value) is excluded: timing then chooses only among equal numbers.
5. The winner has the least estimated time for this run: its one-time costs (export, engine build, warm-up)
   plus the images left at its measured rate; another than the baseline must beat it by MARGIN. When the
   timings stayed noisy and the winner's lead is within the noise, the baseline is kept. torch threads (all
   cores or half) are measured before, torch.compile after, with its compile time charged the same way.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.engines import Candidate, run_views
from stages.engines.torch import TorchEngine, compile_model
from stages.hardware import NATIVE_FLAGS, read_cpu_capability

logger = logging.getLogger(__name__)

PROBE_IMAGES = 8  # images per warm-up and probe run of each candidate, and per thread-count run
NOISE = 1.3  # two runs of one candidate on the same images differing by more than this: a busy machine
MAX_ROUNDS = 4  # timed rounds at most (2 always, more while noisy)
MARGIN = 0.05  # another candidate than the baseline must be estimated this much faster
PARITY_TOLERANCE = 1e-4  # float32 engines: max |difference| <= this x max(1, max |eager float32 value|), per layer
EXPORT_TRIAL_MIN_S = 30.0  # export to ONNX (~15 s on 2 cores) only when eager would take longer for the images left
COMPILE_TRIAL_MIN_S = 60.0  # try torch.compile only when the remaining work is estimated longer


def read_capability(device: str) -> dict[str, Any]:
    """What decides `precision: auto`: the CPU's instruction sets (stages.hardware) and, on CUDA, bf16 support."""
    capability = read_cpu_capability()
    if device == "cuda":
        capability["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
    return capability


def choose_precision(requested: str, *, device: str, capability: dict[str, Any]) -> tuple[str, str]:
    """The precision and why: from `extract.precision` or the hardware alone, never from a timing, so the same
    params on the same machine always store the same dtype.

    auto: CUDA -> its AMP dtype (bf16 where supported, else fp16); CPU -> bf16 only where the CPU has native
    bf16 instructions (emulated bf16 is many times slower than fp32), else float32. Returns (precision,
    reason), e.g. ("bfloat16", "capability: avx512_bf16") or ("float32", "no native bf16: float32").
    """
    if requested != "auto":
        reason = f"params: extract.precision {requested}"
        if device == "cpu" and requested != "float32" and not capability[f"native_{requested}"]:
            reason += (f" (the CPU has none of {', '.join(NATIVE_FLAGS[requested])}: expect it to be slower "
                       f"than float32)")
            logger.warning(reason)
        return requested, reason
    if device == "cuda":
        if capability["cuda_bf16"]:
            return "bfloat16", "capability: cuda bf16 autocast"
        return "float16", "capability: cuda without bf16: float16 autocast"
    if capability["native_bfloat16"]:
        flag = next((f for f in NATIVE_FLAGS["bfloat16"] if capability.get(f)), NATIVE_FLAGS["bfloat16"][-1])
        return "bfloat16", f"capability: {flag}"
    return "float32", "no native bf16: float32"


def candidate_list(device: str, precision: str, engines: Sequence[str] = ("torch", "onnxruntime", "openvino"),
                   *, native_bfloat16: bool = False) -> list[Candidate]:
    """The candidates at `precision`, the baseline (torch eager, contiguous) first. Only numerics-neutral options
    vary: engine and memory layout. OpenVINO bf16 only with native bf16 (it would silently run f32 otherwise)."""
    found = [Candidate("torch", device, precision, "contiguous"), Candidate("torch", device, precision, "channels_last")]
    if device == "cpu":
        if "onnxruntime" in engines and precision == "float32":
            found.append(Candidate("onnxruntime", "cpu", precision, "graph"))
        if "openvino" in engines and (precision == "float32" or (precision == "bfloat16" and native_bfloat16)):
            found.append(Candidate("openvino", "cpu", precision, "graph"))
    if "torch" not in engines and len(found) > 2:  # the baseline stays measured; the torch layouts are not chosen
        return found[:1] + found[2:]
    return found


def reference_of(candidates: Sequence[Candidate]) -> Candidate:
    """Eager float32, contiguous, on the candidates' device: the numbers every float32 engine must match."""
    return Candidate("torch", candidates[0].device, "float32", "contiguous")


# ------------------------------------------------------------------------------------------------ measuring
def _timed(engine: Callable, images: torch.Tensor, views: Sequence[str], pad_to: int | None = None
           ) -> tuple[float, dict[str, np.ndarray]]:
    start = time.perf_counter()
    out = run_views(engine, images, views=views, pad_to=pad_to)  # numpy outputs: CUDA is synchronised
    return time.perf_counter() - start, out


def measure(engines: dict[str, Callable], batches: Sequence[torch.Tensor], *, views: Sequence[str]
            ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Time each engine on real images (see the module docstring, step 4).

    Returns ({name: {"images_per_second", "runs": [{"images", "seconds"}], "warm_up_seconds"}},
    {name: features of the warm-up images {layer: float32 [P, V, D]}}, {"rounds", "noisy"}). A rate is the
    best run on the largest batch the engine ran.
    """
    images = torch.cat(list(batches))
    warm_up = images[:PROBE_IMAGES]
    probe = images[-PROBE_IMAGES:]
    stats: dict[str, dict[str, Any]] = {name: {"runs": []} for name in engines}
    outputs: dict[str, dict[str, np.ndarray]] = {}

    def timed(name: str, batch: torch.Tensor) -> float:
        seconds, _ = _timed(engines[name], batch, views)
        entry = stats[name]
        entry["runs"].append({"images": int(batch.shape[0]), "seconds": round(seconds, 5)})
        largest = max(r["images"] for r in entry["runs"])
        entry["images_per_second"] = round(max(r["images"] / r["seconds"] for r in entry["runs"]
                                               if r["images"] == largest), 2)
        return batch.shape[0] / seconds

    for name, engine in engines.items():
        entry = stats[name]
        entry["warm_up_seconds"], outputs[name] = _timed(engine, warm_up, views)
        entry["warm_up_seconds"] = round(entry["warm_up_seconds"], 4)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    rounds, noisy = 0, True
    while rounds < MAX_ROUNDS and (rounds < 2 or noisy):
        for name in engines:
            rates[name].append(timed(name, probe))
        rounds += 1
        noisy = rounds >= 2 and any(max(r[-2:]) > NOISE * min(r[-2:]) for r in rates.values())
    best = max(entry["images_per_second"] for entry in stats.values())
    finalists = [n for n in engines if stats[n]["images_per_second"] * 1.5 >= best]
    if len(finalists) > 1 and batches[-1].shape[0] > PROBE_IMAGES:
        for name in finalists:
            timed(name, batches[-1])
    return stats, outputs, {"rounds": rounds, "noisy": noisy}


def compare_features(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per layer: max abs difference, max abs reference value, and min/mean cosine similarity per row."""
    result = {}
    for layer, ref in reference.items():
        a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
        b = other[layer].reshape(-1, ref.shape[-1]).astype(np.float64)
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        result[layer] = {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_value": float(np.abs(a).max()),
                         "min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()),
                         "rows": int(a.shape[0])}
    return result


def within_parity(comparison: dict[str, Any]) -> bool:
    """Whether every layer's max |difference| is within PARITY_TOLERANCE x max(1, max |reference value|)."""
    return all(c["max_abs_diff"] <= PARITY_TOLERANCE * max(1.0, c["max_abs_value"]) for c in comparison.values())


def choose(candidates: Sequence[Candidate], rates: dict[str, float], *, costs: dict[str, float], n_todo: float,
           noisy: bool = False) -> tuple[Candidate, dict[str, Any]]:
    """The candidate with the least estimated seconds for this run, `costs[name]` (one-time: export, build,
    warm-up) + `n_todo` / rate; `candidates[0]` (the baseline) unless another is estimated more than MARGIN
    faster. All candidates must share one precision: timing never changes the numbers.

    `noisy`: the measurement stayed noisy; the winner is then kept only when its lead over the baseline is
    larger than NOISE. Returns (chosen, {"estimated_seconds": {name: s}, "decision": text}).
    """
    if len({c.precision for c in candidates}) != 1:
        raise ValueError(f"candidates differ in precision: {[c.name for c in candidates]}; timing may only "
                         f"choose among numerics-neutral options")
    baseline = candidates[0]
    estimates = {c.name: costs.get(c.name, 0.0) + (n_todo / rates[c.name] if rates[c.name] > 0 else float("inf"))
                 for c in candidates}
    fastest = min(candidates, key=lambda c: (estimates[c.name], candidates.index(c)))
    lead = estimates[baseline.name] / max(estimates[fastest.name], 1e-12)
    if fastest == baseline or lead <= 1 / (1 - MARGIN):
        chosen, decision = baseline, "the baseline: no candidate estimated more than 5% faster"
    elif noisy and lead <= NOISE:
        chosen, decision = baseline, (f"fell back to the baseline: the timings stayed noisy after the repeats and "
                                      f"{fastest.name}'s lead ({lead:.2f}x) is within the noise")
    else:
        chosen, decision = fastest, f"fastest estimated ({lead:.2f}x the baseline)"
    if n_todo == 0 and chosen != baseline:  # nothing to compute: rates alone decide, for the report
        decision += " (rates only: nothing to compute)"
    return chosen, {"estimated_seconds": {k: round(v, 3) for k, v in estimates.items()}, "decision": decision}


def choose_threads(engine: Callable, images: torch.Tensor, *, cores: int, views: Sequence[str],
                   margin: float = 0.1) -> tuple[int, dict[str, float]]:
    """torch threads: all cores, unless half of them measures more than `margin` faster on `images`.

    On a CPU shared with other processes a full-width OpenMP team stalls at every barrier waiting for a
    descheduled thread (measured: 2 threads 5-10x slower than 1 on a loaded 2-core machine); on a quiet
    machine all cores win. Returns (threads, {threads: images/s}) and leaves torch set to the choice.
    """
    options = [cores, max(1, cores // 2)]
    rates = dict.fromkeys(options, 0.0)
    for timed in (False, True, True):  # a warm-up round, then two timed rounds, interleaved
        for threads in options:
            torch.set_num_threads(threads)
            seconds, _ = _timed(engine, images, views)
            if timed:
                rates[threads] = max(rates[threads], images.shape[0] / seconds)
    best = max(rates.values())
    chosen = next(t for t in options if rates[t] * (1 + margin) >= best)
    torch.set_num_threads(chosen)
    return chosen, {str(t): round(r, 2) for t, r in rates.items()}


def try_compile(model: nn.Module, engine: TorchEngine, batches: Sequence[torch.Tensor], *, mode: str,
                eager_rate: float | None, n_todo: float, views: Sequence[str], batch_size: int
                ) -> tuple[TorchEngine | None, dict[str, Any]]:
    """torch.compile the chosen torch engine at its precision: always with `compile: on`; with `auto` tried only
    when the remaining work (`n_todo` / `eager_rate`) is estimated longer than COMPILE_TRIAL_MIN_S, and kept
    only when compiling plus the remaining images compiled is estimated faster than the remaining images
    eager (the one-time compile cost is charged against the images left).

    Batches are zero-padded to `batch_size`, as in the extraction loop (one compiled shape). The trial's
    "precision_check" compares compiled features with plain eager fp32 (constant folding changes bits).
    Returns (the compiled engine or None, the trial's report).
    """
    if mode == "off":
        return None, {"tried": False, "reason": "extract.compile is off"}
    if n_todo == 0:
        return None, {"tried": False, "reason": "nothing to compute"}
    estimate = n_todo / eager_rate if eager_rate else 0.0
    if mode == "auto" and estimate < COMPILE_TRIAL_MIN_S:
        return None, {"tried": False, "reason": f"estimated remaining work {estimate:.1f} s < "
                                                f"{COMPILE_TRIAL_MIN_S:.0f} s: compiling cannot pay"}
    batch = batches[0]
    reference = run_views(TorchEngine(model, Candidate("torch", engine.candidate.device, "float32")), batch,
                          views=views)
    eager_seconds, _ = _timed(engine, batch, views, pad_to=batch_size)
    engine.place()
    start = time.perf_counter()
    try:
        compiled = TorchEngine(model, dataclasses.replace(engine.candidate, compile=True),
                               compiled=compile_model(model))
        _, first = _timed(compiled, batch, views, pad_to=batch_size)  # compiles
    except Exception as exc:  # noqa: BLE001 - no C compiler, unsupported op, ...
        logger.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
        return None, {"tried": True, "kept": False, "error": f"{type(exc).__name__}: {exc}"}
    compile_seconds = time.perf_counter() - start
    compiled_seconds, _ = _timed(compiled, batch, views, pad_to=batch_size)
    rate, eager = batch.shape[0] / compiled_seconds, batch.shape[0] / eager_seconds
    estimates = {"eager": n_todo / eager, "compiled": compile_seconds + n_todo / rate}
    trial = {"tried": True, "compile_seconds": round(compile_seconds, 2), "images_per_second": round(rate, 2),
             "eager_images_per_second": round(eager, 2), "images": int(batch.shape[0]),
             "estimated_seconds_left": {k: round(v, 2) for k, v in estimates.items()},
             "precision_check": compare_features(reference, first)}
    trial["kept"] = mode == "on" or estimates["compiled"] < estimates["eager"]
    return (compiled if trial["kept"] else None), trial


# ------------------------------------------------------------------------------------------------ the choice
def build_engine(candidate: Candidate, *, model: nn.Module, graph: Path | None, layers: tuple[str, ...],
                 threads: int) -> Callable:
    """The engine for `candidate`: torch on `model`, a graph engine on the exported `graph`."""
    if candidate.engine == "torch":
        return TorchEngine(model, candidate)
    if graph is None:
        raise ValueError(f"{candidate.name} needs the exported graph")
    if candidate.engine == "onnxruntime":
        from stages.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(graph, layers, candidate, threads=threads)
    if candidate.engine == "openvino":
        from stages.engines.openvino import OpenVinoEngine

        return OpenVinoEngine(graph, layers, candidate, threads=threads)
    raise ValueError(f"unknown engine {candidate.engine!r}")


def select_engine(model: nn.Module, candidates: Sequence[Candidate], batches: Sequence[torch.Tensor], *,
                  n_todo: float, compile_mode: str, views: Sequence[str], cores: int, batch_size: int,
                  layers: tuple[str, ...], graph: Callable[[], tuple[Path, dict[str, Any]]],
                  export_anyway: bool) -> tuple[Callable, dict[str, Any]]:
    """Measure `candidates` on real `batches` and pick one (module docstring). `n_todo`: images left to compute
    (in units of the measured batches; with none, the candidates are still measured for the report).
    `graph()` exports (or loads) the ONNX graph: called only when a graph engine is a candidate and either
    `export_anyway` (the graph is cached, or extract.engines leaves torch out: the user asked for a graph engine)
    or the export can pay. Returns (the engine to run, the report's selection section)."""
    selection: dict[str, Any] = {"candidates": [c.name for c in candidates], "excluded": {}, "precision_check": None}
    baseline = TorchEngine(model, candidates[0])
    probe = batches[-1][:PROBE_IMAGES]
    threads = torch.get_num_threads()
    eager_rate = None  # the baseline's images/s on `probe`, when the thread choice measured it
    if cores > 1 and n_todo:  # first, so that every candidate is compared at the threads it gets
        threads, thread_rates = choose_threads(baseline, probe, cores=cores, views=views)
        selection["threads"] = {"chosen": threads, "images_per_second": thread_rates, "candidate": candidates[0].name,
                                "images": int(probe.shape[0])}
        eager_rate = thread_rates[str(threads)]
    reference = reference_of(candidates)
    engines: dict[str, Callable] = {c.name: TorchEngine(model, c) for c in [*candidates, reference]
                                    if c.engine == "torch"}
    costs = _build_graph_engines([c for c in candidates if c.engine != "torch"], engines, selection, model=model,
                                 baseline=baseline, probe=probe, views=views, n_todo=n_todo, layers=layers,
                                 threads=threads, graph=graph, export_anyway=export_anyway, eager_rate=eager_rate)
    stats, outputs, rounds = measure(engines, batches, views=views)
    selection["measurements"], selection["measurement"] = stats, rounds
    for name, entry in stats.items():
        costs[name] = costs.get(name, 0.0) + entry["warm_up_seconds"]
    selection["one_time_seconds"] = {k: round(v, 3) for k, v in costs.items()}
    allowed, checks = _allowed_by_parity(candidates, engines, reference, outputs, selection)
    rates = {name: entry["images_per_second"] for name, entry in stats.items()}
    chosen, decided = choose(allowed, rates, costs=costs, n_todo=n_todo, noisy=rounds["noisy"])
    selection.update(decided)
    selection["precision_check"] = checks.get(chosen.name)
    if rates[chosen.name] < rates[reference.name]:
        selection["slower_than_eager_float32"] = (
            f"{chosen.name} measured {rates[chosen.name]} images/s, eager float32 {rates[reference.name]}: "
            f"the precision is not chosen by speed; set extract.precision: float32 to use it")
        logger.warning(selection["slower_than_eager_float32"])
    engine = engines[chosen.name]
    if chosen.engine == "torch":
        compiled, selection["compile"] = try_compile(model, engine, batches, mode=compile_mode,
                                                     eager_rate=rates[chosen.name], n_todo=n_todo, views=views,
                                                     batch_size=batch_size)
        check = selection["compile"].pop("precision_check", None)
        if compiled is not None:
            engine, selection["precision_check"] = compiled, check
        else:
            engine.place()
    else:
        selection["compile"] = {"tried": False, "reason": f"{chosen.engine} compiles its own graph"}
    selection["threads_used"] = threads
    return engine, selection


def _allowed_by_parity(candidates: Sequence[Candidate], engines: Mapping[str, Callable], reference: Candidate,
                       outputs: Mapping[str, Any], selection: dict[str, Any]) -> tuple[list[Candidate], dict[str, Any]]:
    """Compare each measured candidate's features with the reference's; at float32, a candidate beyond the parity
    tolerance is excluded (in `selection["excluded"]`, with the reason). Returns (the candidates allowed, in order,
    the requested one always among them and first when it was dropped; the checks by name)."""
    checks = {c.name: compare_features(outputs[reference.name], outputs[c.name]) for c in candidates
              if c.name in engines and c != reference}
    for name, check in checks.items():
        if candidates[0].precision == "float32" and not within_parity(check):
            selection["excluded"][name] = (f"features differ from eager float32 by more than {PARITY_TOLERANCE} x "
                                           f"max(1, |value|): {check}")
            logger.warning("%s excluded: %s", name, selection["excluded"][name])
    allowed = [c for c in candidates if c.name in engines and c.name not in selection["excluded"]]
    if candidates[0] not in allowed:
        allowed.insert(0, candidates[0])
    return allowed, checks


def _build_graph_engines(candidates: Sequence[Candidate], engines: dict[str, Callable], selection: dict[str, Any], *,
                         model: nn.Module, baseline: TorchEngine, probe: torch.Tensor, views: Sequence[str],
                         n_todo: float, layers: tuple[str, ...], threads: int,
                         graph: Callable[[], tuple[Path, dict[str, Any]]], export_anyway: bool,
                         eager_rate: float | None = None) -> dict[str, float]:
    """Add the graph engines among `candidates` to `engines` when the export is cached or can pay; record why
    not in selection["excluded"]. `eager_rate`: the baseline's images/s already measured on `probe` (else timed
    here, after a warm-up). Returns the one-time seconds spent per engine (export + build)."""
    costs: dict[str, float] = {}
    if not candidates:
        return costs
    if not export_anyway:
        if not eager_rate:  # a rough eager rate (the measurement comes later)
            _timed(baseline, probe, views)
            seconds, _ = _timed(baseline, probe, views)
            eager_rate = probe.shape[0] / seconds
        eager_left = n_todo / eager_rate
        if eager_left <= EXPORT_TRIAL_MIN_S:
            for c in candidates:
                selection["excluded"][c.name] = (f"not tried: eager would take ~{eager_left:.0f} s for the "
                                                 f"{n_todo:g} images left, not more than the {EXPORT_TRIAL_MIN_S:.0f} s "
                                                 f"an ONNX export must save to pay (the graph is cached once exported)")
            return costs
    try:
        path, export = graph()
    except Exception as exc:  # noqa: BLE001 - an op the exporter does not support: torch engines remain
        for c in candidates:
            selection["excluded"][c.name] = f"ONNX export failed: {type(exc).__name__}: {exc}"
        logger.warning("ONNX export failed (%s: %s); measuring the torch engines only", type(exc).__name__, exc)
        return costs
    selection["graph"] = export
    baseline.place()
    for c in candidates:
        start = time.perf_counter()
        try:
            engines[c.name] = build_engine(c, model=model, graph=path, layers=layers, threads=threads)
        except Exception as exc:  # noqa: BLE001 - e.g. OpenVINO without native bf16 here
            selection["excluded"][c.name] = f"{type(exc).__name__}: {exc}"
            continue
        costs[c.name] = export["export_seconds"] + time.perf_counter() - start
    return costs
