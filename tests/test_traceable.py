"""Every registered model scripts, FX-traces (with timm's leaf modules and autowrap functions, as timm's own tests
do), ``torch.export``s with a dynamic batch axis and exports to ONNX run in onnxruntime, each matching eager within
1e-4 (issue 12). ONNX export takes 5-120 s per model on 2 CPU cores: the default run exports four models; the rest
are marked ``slow``."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import timm
import torch
from test_models import MODEL_NAMES, build, small_kwargs
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import vision_attn

ATOL = 1e-4
# the default run exports one model per family of our own token-attention code (plain ViT, CCT with conv tokenizer
# and sequence pooling, SPT + LSA) and BoT; the other 37 registered models (timm-based CNN gates, and the slowest,
# attention-augmented convs at 25-120 s each on 2 busy cores) run with -m slow
ONNX_DEFAULT = {"va_vit_tiny_patch4_32", "va_cct_2_3x2_32", "va_vit_spt_lsa_tiny_patch4_32", "va_resnet18_bot_32"}
ONNX_PARAMS = [pytest.param(n, marks=() if n in ONNX_DEFAULT else pytest.mark.slow) for n in MODEL_NAMES]


def eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def other_batch(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    return torch.randn(size, *x.shape[1:], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torchscript_matches_eager(name):
    model, x = build(name)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated
        scripted = torch.jit.script(model)
    assert_matches(eager(scripted, x), eager(model, x))
    assert_matches(eager(scripted, other_batch(x)), eager(model, other_batch(x)))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fx_trace_with_timm_leaf_modules_matches_eager(name):
    model, x = build(name)
    model.eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    extractor = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )
    assert not extractor.training  # create_feature_extractor keeps the model's mode
    (out,) = eager(extractor, x).values()
    assert_matches(out, eager(model, x))
    plain = torch.fx.symbolic_trace(model)  # and without timm's lists
    assert_matches(eager(plain, other_batch(x)), eager(model, other_batch(x)))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torch_export_with_dynamic_batch_matches_eager(name):
    model, x = build(name)
    model.eval()
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = program.module()
    assert_matches(eager(exported, x), eager(model, x))
    assert_matches(eager(exported, other_batch(x)), eager(model, other_batch(x)))


@pytest.mark.parametrize("name", ONNX_PARAMS)
def test_onnx_in_onnxruntime_matches_eager(name):
    pytest.importorskip("onnxscript", reason="ONNX export needs the export extra: pip install -e '.[export]'")
    ort = pytest.importorskip("onnxruntime", reason="ONNX checks need the export extra: pip install -e '.[export]'")
    model, x = build(name)
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(
            model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), input_names=["images"]
        )
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    check = other_batch(x)
    (out,) = session.run(None, {"images": check.numpy()})
    assert_matches(torch.from_numpy(out), eager(model, check))


@pytest.mark.parametrize("name", ["va_vit_tiny_patch4_32", "va_resnet18_cbam_32"])
def test_timm_fx_feature_extraction(name):
    model, x = build(name)
    features = timm.create_model(name, features_only=True, feature_cls="fx", out_indices=(0, 1), **small_kwargs(name))
    outs = eager(features.eval(), x)
    assert len(outs) == 2
    assert all(torch.isfinite(o).all() for o in outs)
    extractor = timm.models.create_feature_extractor(model.eval(), return_nodes=[get_graph_node_names(model)[1][-1]])
    assert_matches(next(iter(eager(extractor, x).values())), eager(model, x))


def test_dynamic_img_size_vit_traces_for_any_size():
    """With ``dynamic_img_size`` the position table is resampled in the graph: other input sizes work traced too."""
    torch.manual_seed(0)
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, dynamic_img_size=True).eval()
    x, other = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 48, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    dim = torch.export.Dim
    grid_h, grid_w = dim("grid_h", min=2, max=64), dim("grid_w", min=2, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: dim("batch"), 2: 4 * grid_h, 3: 4 * grid_w},))
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    last = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)[1][-1]
    fx = create_feature_extractor(model, return_nodes=[last], tracer_kwargs=tracer_kwargs)
    for traced in (scripted, exported.module(), lambda t: next(iter(fx(t).values()))):
        assert_matches(eager(traced, other), eager(model, other))


def test_tracing_keeps_eager_validation():
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model)
    torch.fx.symbolic_trace(model)
    with pytest.raises(ValueError, match=r"1 channels .*in_chans=3"):  # the eager model still checks its input
        model(torch.randn(1, 1, 32, 32))
    cnn = vision_attn.create_model("va_resnet18_aa_32", layers=(1, 1, 1, 1)).eval()
    torch.fx.symbolic_trace(cnn)
    with pytest.raises(ValueError, match=r"larger than img_size 32x32"):
        cnn(torch.randn(1, 3, 48, 48))


def test_scripted_model_keeps_layer_size_checks():
    """TorchScript keeps the value checks that need no Python (the AA layer's table size), unlike FX graphs."""
    cnn = vision_attn.create_model("va_resnet18_aa_32", layers=(1, 1, 1, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(cnn)
    with pytest.raises(torch.jit.Error, match=r"larger than this AugmentedConv2d's feat_size"):
        scripted(torch.randn(1, 3, 48, 48))
