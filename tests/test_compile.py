"""torch.compile(fullgraph=True) captures the edited transformer in one graph and computes the eager result."""
import pytest
import torch
import torch._dynamo

import dit_attn as da

from .conftest import CallRecorder, flux_call, sd3_call

EDITS = {
    "softpag u=0": lambda: (da.SoftPAG(["L1"], u=0.0),),
    "softpag": lambda: (da.SoftPAG(["L1H0", "L2"], u=0.7, scope="image", target="uniform"), da.SoftPAG(["L0H1"], u=1.0)),
    "local": lambda: (da.LocalAttention(radius=2.0, layers=[1, 2], backend="tiled"),),
}


def first_call(pipe, family):
    with CallRecorder(pipe) as rec:
        (sd3_call if family == "sd3" else flux_call)(pipe, steps=1)
    return {**rec.calls[0], "return_dict": False}


@pytest.fixture(scope="module")
def chroma_pipe():
    from dit_attn.toy.chroma import build_chroma_pipeline

    pipe = build_chroma_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family,edit", [("sd3", "softpag u=0"), ("sd3", "softpag"), ("sd3", "local"), ("flux", "softpag"),
                                         ("chroma", "softpag")])  # Chroma: under the pipeline's mask
def test_fullgraph_compile_equals_eager(family, edit, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    call = first_call(pipe, family)
    with torch.no_grad(), da.apply(pipe.transformer, *EDITS[edit]()):
        eager = pipe.transformer(**call)[0]
        torch._dynamo.reset()
        compiled = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager")
        got = compiled(**call)[0]
    torch._dynamo.reset()
    assert (got - eager).abs().max() < 1e-5
    if edit != "softpag u=0":
        with torch.no_grad():
            assert (got - pipe.transformer(**call)[0]).abs().max() > 1e-4  # the edit ran inside the graph
