"""The TensorRT path without TensorRT: profile shapes, precision rules, engine metadata and cache paths
as pure functions, and the builder / loader driven through fake ``tensorrt`` and ``cupy`` modules that
record what the code asks of the documented 10.x API. No GPU, no TensorRT needed."""
import json
import sys
import types
from enum import Enum

import pytest

from lrm_rt import tensorrt_backend as T
from lrm_rt.config import NAMED_CONFIGS
from lrm_rt.errors import BackendError, ConfigError
from lrm_rt.export.onnx_export import graph_specs


# --- pure functions ------------------------------------------------------------------------------

def test_profile_shapes_from_graph_specs():
    specs = graph_specs(NAMED_CONFIGS["openlrm-obj-small-1.1"])
    shapes = T.profile_shapes(specs["transformer"]["inputs"], max_batch=4, opt_batch=2)
    assert shapes["tokens"] == ((1, 257, 384), (2, 257, 384), (4, 257, 384))
    assert shapes["camera"] == ((1, 16), (2, 16), (4, 16))
    enc = T.profile_shapes(graph_specs(NAMED_CONFIGS["triposr"])["encoder"]["inputs"], max_batch=1)
    assert enc == {"pixels": ((1, 3, 512, 512),) * 3}
    assert T.profile_shapes([{"name": "x", "shape": [-1, 8]}], max_batch=3)["x"][2] == (3, 8)


@pytest.mark.parametrize("inputs,kw", [([{"name": "x", "shape": ["batch", "n"]}], {"max_batch": 2}),
                                       ([{"name": "x", "shape": ["batch", 4]}], {"max_batch": 2, "opt_batch": 3}),
                                       ([{"name": "x", "shape": ["batch", 4]}], {"max_batch": 0})])
def test_profile_shapes_rejects(inputs, kw):
    with pytest.raises(BackendError):
        T.profile_shapes(inputs, **kw)


def test_precision_rules():
    L = T.LayerInfo
    layers = [
        L("/net/encoder/model/blocks.0/norm1/LayerNormalization", "NORMALIZATION"),
        L("/net/encoder/model/blocks.0/attn/MatMul", "MATRIX_MULTIPLY"),
        L("/net/encoder/model/blocks.0/attn/Softmax", "SOFTMAX"),
        L("/exp_of_something", "UNARY", "EXP"),
        L("/gelu/Erf", "UNARY", "ERF"),
        L("/scale/Sqrt", "UNARY", "SQRT", ("FLOAT",)),
        L("/shape/Sqrt_int", "UNARY", "SQRT", ("INT64",)),  # shape arithmetic: left alone
        L("/var/Pow", "ELEMENTWISE", "POW"),
        L("/res/Add", "ELEMENTWISE", "SUM"),
        L("/net/upsampler/ConvTranspose", "DECONVOLUTION"),
        L("/ln/ReduceMean", "REDUCE"),
        L("/ln/ReduceMean_shape", "REDUCE", None, ("INT32",)),
        L("myelin_fused/LayerNormalization_1", "PLUGIN_V2", None, ("HALF",)),
        L("/proj/Conv", "CONVOLUTION"),
    ]
    pinned = {name: reason for _, name, reason in T.fp32_layers(layers)}
    assert set(pinned) == {
        "/net/encoder/model/blocks.0/norm1/LayerNormalization", "/net/encoder/model/blocks.0/attn/Softmax",
        "/exp_of_something", "/scale/Sqrt", "/var/Pow", "/net/upsampler/ConvTranspose", "/ln/ReduceMean",
        "myelin_fused/LayerNormalization_1"}
    assert pinned["/exp_of_something"] == "unary EXP"
    assert pinned["myelin_fused/LayerNormalization_1"].startswith("name contains")


def test_engine_metadata_and_checks(tmp_path):
    ident = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    meta = T.engine_metadata(graph="encoder", onnx_sha256="ab" * 32, precision="fp16",
                             profile={"pixels": ((1, 3, 8, 8),) * 3}, **ident)
    assert json.loads(json.dumps(meta)) == meta
    expected = {**ident, "graph": "encoder", "onnx_sha256": "ab" * 32}
    assert T.metadata_mismatches(meta, expected) == []
    other = {**expected, "tensorrt_version": "10.7.0", "compute_capability": "8.7", "onnx_sha256": "cd" * 32}
    problems = T.metadata_mismatches(meta, other)
    assert len(problems) == 3 and any("TensorRT '10.3.0' != '10.7.0'" in p for p in problems)
    with pytest.raises(BackendError, match="rebuild with lrm-rt export --tensorrt"):
        T.check_engine_metadata(meta, other, "e.plan", tmp_path)
    with pytest.raises(BackendError, match="metadata format"):
        T.check_engine_metadata({**meta, "format_version": 0}, expected, "e.plan", tmp_path)
    with pytest.raises(BackendError, match="missing.*rebuild with lrm-rt export --tensorrt"):
        T.read_engine_metadata(tmp_path / "nothing.plan", tmp_path)


def test_paths_and_gpu_identity(tmp_path):
    assert T.engine_path(tmp_path, "encoder", "fp16") == tmp_path / "tensorrt" / "encoder.fp16.plan"
    assert T.metadata_path(tmp_path / "a.plan") == tmp_path / "a.plan.json"
    a = T.timing_cache_path(tmp_path, "10.3.0", "8.7")
    assert a.name == "timing-trt10.3.0-sm87.cache" and a != T.timing_cache_path(tmp_path, "10.3.0", "9.0")
    ident = T.gpu_identity_from_props({"name": b"Orin\x00\x00junk", "major": 8, "minor": 7})
    assert ident == {"gpu_name": "Orin", "compute_capability": "8.7"}


# --- without TensorRT ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_export(fixtures_dir, tmp_path_factory):
    from lrm_rt.checkpoint import load_model
    from lrm_rt.export import export_model

    d = tmp_path_factory.mktemp("trt") / "x"
    export_model(load_model(str(fixtures_dir / "checkpoints" / "openlrm-tiny-1.1")), d, log=lambda m: None)
    return d


def test_clear_errors_without_tensorrt(tiny_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        T.require_tensorrt()
    with pytest.raises(BackendError, match="no TensorRT engines.*lrm-rt export --tensorrt"):
        T.TensorRTNetworkBackend(tiny_export)
    from lrm_rt.pipeline import Reconstructor

    with pytest.raises(BackendError, match="no TensorRT engines"):
        Reconstructor(str(tiny_export), network_backend="tensorrt")


# --- builder and loader through fake tensorrt / cupy -------------------------------------------------

LayerType = Enum("LayerType", "NORMALIZATION MATRIX_MULTIPLY UNARY SHUFFLE DECONVOLUTION")
DataType = Enum("DataType", "FLOAT HALF INT64")
UnaryOperation = Enum("UnaryOperation", "EXP ERF")


class FakeTensor:
    def __init__(self, dtype):
        self.dtype = dtype


class FakeLayer:
    def __init__(self, name, type_, dtype=DataType.FLOAT, op=None):
        self.name, self.type, self._op = name, type_, op
        self.outputs = [FakeTensor(dtype)]
        self.num_outputs = 1
        self.precision = None
        self.output_types = {}

    def get_output(self, j):
        return self.outputs[j]

    def set_output_type(self, j, dt):
        self.output_types[j] = dt


def _fake_trt(version="10.3.0"):
    trt = types.SimpleNamespace(__version__=version, float32="float32")
    calls = trt.calls = {"flags": [], "shapes": {}, "cache_in": None}

    class IUnaryLayer(FakeLayer):
        @property
        def op(self):
            return self._op

    trt.IUnaryLayer = IUnaryLayer
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=0: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY")

    class Network:
        def __init__(self):
            self.layers = [FakeLayer("/ln/LayerNormalization", LayerType.NORMALIZATION),
                           FakeLayer("/attn/MatMul", LayerType.MATRIX_MULTIPLY),
                           FakeLayer("/act/Exp", LayerType.UNARY, op=UnaryOperation.EXP),
                           FakeLayer("/gelu/Erf", LayerType.UNARY, op=UnaryOperation.ERF),
                           FakeLayer("/shape/Reshape", LayerType.SHUFFLE, DataType.INT64),
                           FakeLayer("/up/ConvTranspose", LayerType.DECONVOLUTION)]
            self.num_layers = len(self.layers)
            self.outs = [FakeTensor(DataType.HALF)]
            self.num_outputs = 1

        def get_layer(self, i):
            return self.layers[i]

        def get_output(self, j):
            return self.outs[j]

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, f):
            calls["flags"].append(f)

        def add_optimization_profile(self, p):
            calls["profiles"] = calls.get("profiles", 0) + 1

        def create_timing_cache(self, data):
            calls["cache_in"] = data
            return "cache"

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["ignore_mismatch"] = ignore_mismatch

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"timing")

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            calls["network"] = Network()
            return calls["network"]

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda n, a, b, c: calls["shapes"].__setitem__(n, (a, b, c)))

        def build_serialized_network(self, network, config):
            return b"ENGINE"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.setdefault("parsed", []).append(path)
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data == b"ENGINE"
            return types.SimpleNamespace(create_execution_context=lambda: "context")

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


def _fake_cupy(name=b"NVIDIA H100", cc=(9, 0)):
    class Ctx:
        def __init__(self, *a, **k):
            self.ptr = 0

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=RuntimeError,
                                    getDeviceProperties=lambda i: {"name": name, "major": cc[0], "minor": cc[1]})
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, Device=Ctx, Stream=Ctx))


def test_build_and_load_with_fake_tensorrt(tiny_export, tmp_path, monkeypatch):
    import shutil

    from lrm_rt.export import read_manifest

    d = tmp_path / "x"
    shutil.copytree(tiny_export, d)
    trt = _fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    man = read_manifest(d)
    info = T.build_engines(d, man, fp16=True, max_batch=4, log=lambda m: None)
    calls = trt.calls
    # One config and one optimisation profile per graph (encoder, transformer).
    assert calls["flags"] == ["FP16", "OBEY"] * 2 and calls["profiles"] == 2 and calls["ignore_mismatch"] is False
    assert calls["shapes"]["camera"] == ((1, 16), (1, 16), (4, 16))
    net = calls["network"]  # the transformer's
    pinned = {l.name for l in net.layers if l.precision == "float32"}
    assert pinned == {"/ln/LayerNormalization", "/act/Exp", "/up/ConvTranspose"}
    assert all(l.output_types == {0: "float32"} for l in net.layers if l.name in pinned)
    assert net.outs[0].dtype == "float32"
    assert info["engines"]["encoder"]["file"] == "tensorrt/encoder.fp16.plan"
    assert (d / info["timing_cache"]).read_bytes() == b"timing"
    meta = json.loads((d / info["engines"]["transformer"]["metadata"]).read_text())
    assert meta["onnx_sha256"] == man["graphs"]["transformer"]["sha256"]
    assert (meta["gpu_name"], meta["compute_capability"], meta["tensorrt_version"]) == ("NVIDIA H100", "9.0", "10.3.0")

    # A second build reuses the timing cache file.
    T.build_engines(d, man, fp16=True, max_batch=4, log=lambda m: None)
    assert trt.calls["cache_in"] == b"timing"

    man["tensorrt"] = info
    from lrm_rt.export.manifest import write_manifest

    write_manifest(d, man)
    backend = T.TensorRTNetworkBackend(d)
    assert backend.max_batch == 4 and backend.config == man["_config"] and backend.precision == "fp16"
    assert T.TensorRTNetworkBackend(d, precision="fp16").precision == "fp16"
    # an engine's precision is fixed at build time: asking for another is refused, naming the rebuild
    with pytest.raises(ConfigError, match="built in fp16, not fp32: drop --precision, or rebuild"):
        T.TensorRTNetworkBackend(d, precision="fp32")
    with pytest.raises(ConfigError, match="not available with tensorrt"):
        T.TensorRTNetworkBackend(d, precision="bf16")

    # An engine file replaced without its metadata (e.g. copied from another export): refused by its hash.
    plan = d / info["engines"]["encoder"]["file"]
    good = plan.read_bytes()
    plan.write_bytes(good + b"x")
    with pytest.raises(BackendError, match="is not the engine this export built"):
        T.TensorRTNetworkBackend(d)
    plan.write_bytes(good)

    # Same engines on another GPU / TensorRT version, or after the ONNX changed: refuse, name the fix.
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(b"Orin", (8, 7)))
    with pytest.raises(BackendError, match="GPU 'NVIDIA H100' != 'Orin'.*rebuild with lrm-rt export --tensorrt"):
        T.TensorRTNetworkBackend(d)
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("10.7.0"))
    with pytest.raises(BackendError, match="TensorRT '10.3.0' != '10.7.0'"):
        T.TensorRTNetworkBackend(d)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    man["graphs"]["encoder"]["sha256"] = "0" * 64
    write_manifest(d, man)
    with pytest.raises(BackendError, match="ONNX sha256"):
        T.TensorRTNetworkBackend(d)


def test_gpu_index_and_precision_reach_the_gpu_backends(monkeypatch, tmp_path):
    """--device cuda:N runs the field and the TensorRT engines on GPU N too (they once took GPU 0 / CuPy's
    current one), and the Python default precision leaves TensorRT engines as built."""
    import lrm_rt.field.cuda as C
    from lrm_rt.pipeline import exported_network_backend, field_backend

    seen = {}
    monkeypatch.setattr(C, "CudaFieldBackend", lambda device=None: seen.setdefault("field", device))
    monkeypatch.setattr(T, "TensorRTNetworkBackend", lambda d, **kw: seen.setdefault("trt", kw))
    field_backend("auto", "cuda:1")
    exported_network_backend(tmp_path, "tensorrt", "cuda:2")
    assert seen == {"field": 1, "trt": {"device": "cuda:2", "device_id": 2, "precision": "auto"}}
    seen.clear()
    field_backend("cuda", "cuda")
    exported_network_backend(tmp_path, "tensorrt", "cuda", precision="fp16")
    assert seen == {"field": None, "trt": {"device": "cuda", "device_id": 0, "precision": "fp16"}}
