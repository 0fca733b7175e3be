"""PSA under torch.compile on tiny pipelines: ``transformer.compile()``, ``torch.compile(transformer)``
and ``compile_repeated_blocks(fullgraph=True)``, with ``enable_psa`` before or after compiling.

What is asserted (docs/design.md, section 5):

* no graph break inside a transformer block (``fullgraph=True`` on the blocks compiles), and around a
  whole compiled transformer only the step hook's two, at its boundary;
* one graph for a whole run of a preset -- its dense steps, the switch to sparse steps, Gilbert order
  -- exactly as many graphs as dense attention needs, so no recompile per step or per block;
* compiled output equals eager PSA (inductor).

Graph counts use a counting backend that runs the graphs eagerly (fast); the inductor tests compile
for real (about 10 s per graph on a 2-core CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from psa_diffusers.diffusers import PSAProcessor, enable_psa
from tests.tiny_models import (  # noqa: F401  (one_thread is a fixture)
    FAMILY,
    SPARSE,
    build,
    one_thread,
    rel_err,
    tiny_preset,
)

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")

GILBERT = SPARSE.replace(token_order="gilbert")
STEPS = 4  # the tiny preset: 2 dense steps, then 2 sparse ones


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compile(pipe, style: str, backend) -> None:
    if style == "module.compile":
        pipe.transformer.compile(backend=backend)
    elif style == "torch.compile":
        pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    else:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)


def _preset(kind: str):
    return tiny_preset(FAMILY[kind], config=GILBERT)


def _schedule(stats) -> list[bool]:
    return [all(s.dense for s in stats[step].values()) for step in sorted(stats)]


def _breaks() -> list[str]:
    return list(counters["graph_break"])


STYLES = ["module.compile", "torch.compile", "compile_repeated_blocks"]


@pytest.mark.parametrize("order", ["enable-then-compile", "compile-then-enable"])
@pytest.mark.parametrize("style", STYLES)
def test_wan_one_graph_per_run_and_no_break_in_blocks(style, order):
    """A 4-step run with guidance (8 forwards): dense steps, the switch, sparse steps, Gilbert order."""
    pipe, call = build("wan")
    eager_stock = call(num_inference_steps=STEPS)
    with enable_psa(pipe, preset=_preset("wan")):
        eager_psa = call(num_inference_steps=STEPS)

    dense = CompileCounter()
    _compile(pipe, style, dense)
    stock = call(num_inference_steps=STEPS)
    assert rel_err(stock, eager_stock) < 1e-6
    stock_breaks = _breaks()
    counters.clear()

    # a fresh pipeline for PSA, so that its graphs are counted alone
    torch._dynamo.reset()
    pipe, call = build("wan")
    graphs = CompileCounter()
    if order == "enable-then-compile":
        handle = enable_psa(pipe, preset=_preset("wan"))
        _compile(pipe, style, graphs)
    else:
        _compile(pipe, style, graphs)
        handle = enable_psa(pipe, preset=_preset("wan"))
    out = call(num_inference_steps=STEPS)
    assert _schedule(handle.stats()) == [True, True, False, False]
    assert rel_err(out, eager_psa) < 1e-5
    assert graphs.frame_count == dense.frame_count == 1  # the whole run, all blocks: one graph
    assert graphs.op_count <= 1.5 * dense.op_count  # compile work: at most 1.5x dense's
    assert stock_breaks == []
    breaks = _breaks()
    if style == "compile_repeated_blocks":
        assert breaks == []  # fullgraph=True held in every block
    else:  # whole transformer: only the step hook's pre_forward and post_forward, at its boundary
        assert breaks and all("PSAStepHook.pre_forward" in b or "PSAStepHook.post_forward" in b for b in breaks)

    out = call(num_inference_steps=STEPS)  # a second run reuses the graph
    assert graphs.frame_count == 1
    handle.disable()
    assert rel_err(call(num_inference_steps=STEPS), eager_stock) < 1e-6  # compiled, dense again


@pytest.mark.parametrize("style", ["module.compile", "torch.compile"])
def test_cogvideox_one_graph_per_run(style):
    """CogVideoX passes no step index: the step comes from the timestep's place in its schedule."""
    pipe, call = build("cogvideox")
    with enable_psa(pipe, preset=_preset("cogvideox")):
        eager_psa = call(num_inference_steps=STEPS)
    graphs = CompileCounter()
    _compile(pipe, style, graphs)
    handle = enable_psa(pipe, preset=_preset("cogvideox"))
    out = call(num_inference_steps=STEPS)
    assert _schedule(handle.stats()) == [True, True, False, False]
    assert rel_err(out, eager_psa) < 1e-5
    assert graphs.frame_count == 1
    assert all("PSAStepHook" in b for b in _breaks())


def test_recompile_limit_is_not_approached_by_a_long_run():
    """Twenty steps of a preset on compiled blocks: still one graph (the step is never guarded on)."""
    pipe, call = build("wan")
    graphs = CompileCounter()
    handle = enable_psa(pipe, preset=tiny_preset("wan", num_steps=20, dense_steps=5, config=GILBERT))
    _compile(pipe, "compile_repeated_blocks", graphs)
    call(num_inference_steps=20, guidance_scale=1.0)
    assert _schedule(handle.stats()) == [True] * 5 + [False] * 15
    assert graphs.frame_count == 1


@pytest.mark.parametrize(
    "kind, style, order",
    [
        ("wan", "module.compile", "enable-then-compile"),
        ("wan", "compile_repeated_blocks", "compile-then-enable"),
        ("cogvideox", "torch.compile", "compile-then-enable"),
    ],
)
def test_inductor_output_equals_eager_psa(kind, style, order):
    pipe, call = build(kind)
    with enable_psa(pipe, preset=_preset(kind)):
        eager = call(num_inference_steps=STEPS)
    if order == "enable-then-compile":
        handle = enable_psa(pipe, preset=_preset(kind))
        _compile(pipe, style, "inductor")
    else:
        _compile(pipe, style, "inductor")
        handle = enable_psa(pipe, preset=_preset(kind))
    out = call(num_inference_steps=STEPS)
    assert _schedule(handle.stats()) == [True, True, False, False]
    assert rel_err(out, eager) < 1e-4


def test_a_processor_installed_by_hand_compiles_without_a_break():
    """One PSAProcessor on every layer of Wan (cross-attention runs stock through it), no hooks: raster
    order, the sparse budget at every step; fullgraph blocks, one graph, eager's output."""
    pipe, call = build("wan")
    pipe.transformer.set_attn_processor(PSAProcessor(GILBERT))
    eager = call(num_inference_steps=2)
    graphs = CompileCounter()
    _compile(pipe, "compile_repeated_blocks", graphs)
    out = call(num_inference_steps=2)
    assert rel_err(out, eager) < 1e-5
    assert graphs.frame_count == 1 and _breaks() == []
