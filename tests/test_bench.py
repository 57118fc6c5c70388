"""The benchmark suite (benchmarks/, ``lrm-rt bench``): structure of its outputs and its parity gate.

Speed is not tested here (only the suite's own output reports it); these runs use a tiny random
TripoSR-shaped model and 16-32^3 grids so they take seconds.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import suite as S  # noqa: E402
from lrm_rt.field.torch_ref import TorchFieldBackend  # noqa: E402
from lrm_rt.mesh import Mesh  # noqa: E402


class ShiftedField(TorchFieldBackend):
    """Deliberately wrong: scales the density grid, which moves the iso-surface."""

    name = "broken-field"

    def density_grid(self, field, resolution, level=None):
        return super().density_grid(field, resolution) * 1.6


class NoisyNetwork:
    """Deliberately wrong: the baseline network plus 5% noise on the triplane."""

    def __init__(self, inner):
        self.inner = inner
        self.weights, self.biases, self.config = inner.weights, inner.biases, inner.config

    def run(self, pixels, camera=None):
        tri, t = self.inner.run(pixels, camera)
        gen = torch.Generator().manual_seed(1)
        return tri + 0.05 * float(tri.abs().max()) * torch.randn(tri.shape, generator=gen), t


def _broken_net(ctx):
    return NoisyNetwork(S._torch_net("fp32")(ctx))


EXTRA_NET = {"broken-net": S.NetEntry("broken-net", "fp32", _broken_net)}
EXTRA_FIELD = {
    "broken-field": S.FieldEntry("broken-field", lambda ctx: (ShiftedField(), "cpu", "pymcubes")),
    # the reference again under another name: a fast path that must pass the gate
    "torch-copy": S.FieldEntry("torch-copy", lambda ctx: (TorchFieldBackend(), "cpu", "pymcubes")),
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    settings = S.settings_from_args(["--quick", "--models", "tiny-triposr", "--resolutions", "16,24",
                                     "--e2e-resolution", "24", "--render-size", "16", "--out", str(out),
                                     "--network-backends", "torch-fp32,broken-net,tensorrt",
                                     "--field-backends", "torch,torch-copy,broken-field,cuda", "--device", "cpu"])
    logs = []
    results = S.run_suite(settings, EXTRA_NET, EXTRA_FIELD, log=logs.append)
    return out, results, logs


def _rows(results, kind, **match):
    return [r for r in results[kind] if all(r.get(k) == v for k, v in match.items())]


def test_outputs_written(quick):
    out, results, _ = quick
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == S.SCHEMA
    for key in ("machine", "settings", "baseline", "tolerances", "models", "unavailable", "network", "extraction",
                "render", "end_to_end", "scaling", "targets"):
        assert key in data, key
    m = data["machine"]
    for key in ("slug", "cpu", "usable_cores", "threads", "libraries"):
        assert key in m
    assert m["slug"].startswith(("cpu-", "gpu-"))
    assert data["models"][0]["surface"]["kind"] == "synthetic"
    assert {t["id"] for t in data["targets"]} == {"cpu_e2e_15x", "extract_20x", "gpu_e2e_50ms"}
    # tiny model: every target is "not measured", none claims met / not met
    assert all(t["met"] is None for t in data["targets"])


def test_markdown_sections(quick):
    out, _, _ = quick
    md = (out / "results.md").read_text()
    for heading in ("## Targets", "## End to end", "## Network", "## Mesh extraction", "## Novel-view rendering",
                    "## FAILING / errors", "## Unavailable on this machine"):
        assert heading in md, heading
    assert "| model | network | field | MC | batch | R | preprocess | encoder | transformer |" in md
    assert "**FAILING**" in md


def test_baseline_rows_are_timed(quick):
    _, results, _ = quick
    for kind, match in (("network", {"network_backend": "torch-fp32"}), ("extraction", {"field_backend": "torch"}),
                        ("render", {"field_backend": "torch"}),
                        ("end_to_end", {"network_backend": "torch-fp32", "field_backend": "torch"})):
        rows = _rows(results, kind, **match)
        assert rows, kind
        for r in rows:
            assert r["status"] == "ok", r
            tot = r["timings"][r["total_key"]]
            assert tot["median"] > 0 and tot["p90"] >= tot["median"] and len(tot["runs"]) == r["repeats"]
            assert r["peak_rss_mb"] > 0
    e2e = _rows(results, "end_to_end", network_backend="torch-fp32", field_backend="torch")[0]
    for stage in S.E2E_STAGES:
        assert stage in e2e["timings"], stage


def test_broken_paths_fail_the_gate_and_are_not_timed(quick):
    _, results, _ = quick
    bad_field = _rows(results, "extraction", field_backend="broken-field")
    assert len(bad_field) == 2
    for r in bad_field:
        assert r["status"] == "FAILING" and "timings" not in r
        failed = {c["check"] for c in r["parity"]["checks"] if not c["ok"]}
        assert "chamfer_voxels" in failed
    bad_e2e = _rows(results, "end_to_end", field_backend="broken-field")
    assert bad_e2e and all(r["status"] == "FAILING" and "timings" not in r for r in bad_e2e)
    bad_net = _rows(results, "network", network_backend="broken-net")
    assert bad_net and all(r["status"] == "FAILING" and "timings" not in r for r in bad_net)
    assert any(c["check"] == "triplane_rel_err" and not c["ok"] for c in bad_net[0]["parity"]["checks"])
    # a failing network takes no part in the end-to-end runs
    assert not _rows(results, "end_to_end", network_backend="broken-net")


def test_passing_fast_path_is_timed_with_speedup(quick):
    _, results, _ = quick
    for kind in ("extraction", "render", "end_to_end"):
        rows = _rows(results, kind, field_backend="torch-copy")
        assert rows, kind
        for r in rows:
            assert r["status"] == "ok" and r["parity"]["passed"], r
            assert r["speedup_vs_baseline"] > 0
    ext = _rows(results, "extraction", field_backend="torch-copy")[0]
    assert {c["check"] for c in ext["parity"]["checks"]} >= {"chamfer_voxels", "face_count_diff", "grid_sign_mismatch"}


def test_unavailable_backends_are_listed(quick):
    _, results, logs = quick
    names = {(u["kind"], u["name"]) for u in results["unavailable"]}
    if not torch.cuda.is_available():
        assert ("field", "cuda") in names and ("network", "tensorrt") in names
    assert all(u["reason"] for u in results["unavailable"])
    assert any("unavailable" in line for line in logs)


def test_baseline_cap_is_extrapolated_and_labelled(tmp_path):
    settings = S.settings_from_args(["--models", "tiny-triposr", "--resolutions", "16,20,28", "--batch", "1",
                                     "--repeats", "1", "--warmup", "1", "--e2e-resolution", "28", "--render-size", "8",
                                     "--baseline-max-resolution", "20", "--network-backends", "torch-fp32",
                                     "--field-backends", "torch,torch-copy", "--device", "cpu", "--no-plots",
                                     "--out", str(tmp_path)])
    results = S.run_suite(settings, None, EXTRA_FIELD, log=lambda m: None)
    base = _rows(results, "extraction", field_backend="torch", resolution=28)[0]
    assert base["status"] == "extrapolated" and "power law" in base["reason"]
    fast = _rows(results, "extraction", field_backend="torch-copy", resolution=28)[0]
    assert fast["status"] == "ok" and fast.get("speedup_note") == "baseline extrapolated"
    assert [c["check"] for c in fast["parity"]["checks"]] == [
        "grid_sign_mismatch_sampled", "chamfer_voxels_vs_pymcubes_mc", "hausdorff_voxels_vs_pymcubes_mc",
        "face_count_diff_vs_pymcubes_mc", "area_rel_diff_vs_pymcubes_mc", "volume_rel_diff_vs_pymcubes_mc"]
    e2e = _rows(results, "end_to_end", field_backend="torch")[0]
    assert e2e["status"] == "extrapolated"
    assert "extrapolated" in (tmp_path / "results.md").read_text()


def test_parity_checks_unit():
    v = np.random.default_rng(0).uniform(-1, 1, (200, 3)).astype(np.float32)
    f = np.arange(198 * 3).reshape(-1, 3) % 200
    ref = Mesh(v, f, np.full((200, 3), 0.5, np.float32))
    same = S.mesh_checks(ref, ref, 0.01, S.TOLERANCES["same_triplane"])
    assert S.parity_result(same)["passed"]
    moved = Mesh(v + 0.01, f, ref.vertex_colors)
    assert not S.parity_result(S.mesh_checks(moved, ref, 0.01, S.TOLERANCES["same_triplane"]))["passed"]
    fewer = Mesh(v, f[:100], ref.vertex_colors)
    assert not S.parity_result(S.mesh_checks(fewer, ref, 0.01, S.TOLERANCES["same_triplane"]))["passed"]
    t = torch.randn(1, 3, 4, 8, 8)
    assert S.parity_result(S.triplane_checks(t + 1e-6, t, "fp32"))["passed"]
    assert not S.parity_result(S.triplane_checks(t * 1.1, t, "fp32"))["passed"]
    g = np.linspace(0, 2, 27, dtype=np.float32).reshape(3, 3, 3)
    assert S.parity_result(S.grid_sign_checks(np.where(g > 1, 5.0, -5.0), g, 1.0))["passed"]
    assert not S.parity_result(S.grid_sign_checks(g[::-1].copy(), g, 1.0))["passed"]


def test_targets_logic():
    def e2e(net, fld, total):
        return {"kind": "end_to_end", "model": "triposr", "network_backend": net, "field_backend": fld, "batch": 1,
                "resolution": 256, "status": "ok", "total_key": "total", "timings": {"total": {"median": total}}}

    def ext(fld, res, total):
        return {"kind": "extraction", "model": "triposr", "field_backend": fld, "resolution": res, "status": "ok",
                "total_key": "extraction", "timings": {"extraction": {"median": total}}}

    rows = {"network": [], "render": [],
            "end_to_end": [e2e("torch-fp32", "torch", 80.0), e2e("torch-fp32", "native", 4.0), e2e("torch-bf16", "native", 8.0)],
            "extraction": [ext("torch", 256, 60.0), ext("native", 128, 0.5), ext("native", 256, 2.0), ext("native", 512, 8.0)]}
    S.add_speedups(rows)
    fits = S.scaling_fits(rows)
    machine = {"usable_cores": 2}
    t = {x["id"]: x for x in S.evaluate_targets(rows, fits, machine)}
    assert t["cpu_e2e_15x"]["met"] is True and t["cpu_e2e_15x"]["measured"] == "20.0x"
    assert t["cpu_e2e_15x"]["path"] == "torch-fp32/native"
    assert t["extract_20x"]["met"] is True and t["extract_r2"]["met"] is True
    assert abs(next(f for f in fits if f["field_backend"] == "native")["slope"] - 2.0) < 1e-6
    assert t["gpu_e2e_50ms"]["met"] is None
    rows["extraction"][2]["timings"]["extraction"]["median"] = 4.0  # 15x only
    for r in rows["extraction"]:
        r.pop("speedup_vs_baseline", None)
    S.add_speedups(rows)
    t = {x["id"]: x for x in S.evaluate_targets(rows, S.scaling_fits(rows), machine)}
    assert t["extract_20x"]["met"] is False


def test_cli_entry(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lrm_rt.cli", "bench", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--quick" in r.stdout and "--baseline-max-resolution" in r.stdout
    unloadable = tmp_path / "unloadable"
    unloadable.mkdir()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lrm_rt.cli", "bench", "--models", f"{unloadable},tiny-triposr",
                        "--resolutions", "12", "--e2e-resolution", "12", "--batch", "1", "--repeats", "1",
                        "--render-size", "8", "--network-backends", "torch-fp32", "--field-backends", "torch",
                        "--no-plots", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "Targets:" in r.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith(f"lrm-rt bench --models {unloadable},tiny-triposr")
    # a model that cannot be loaded is reported, the others still run
    assert [e["model"] for e in data["model_errors"]] == [str(unloadable)]
    assert [m["name"] for m in data["models"]] == ["tiny-triposr"] and data["end_to_end"]


def test_bench_entry_without_checkout(monkeypatch, tmp_path, capsys):
    import lrm_rt.bench as B

    monkeypatch.setattr(B, "REPO", tmp_path)
    with pytest.raises(SystemExit) as exc:
        B.main(["--quick"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "source checkout" in err


@pytest.mark.parametrize("args, pattern", [
    (["--device", "foo"], "--device must be auto, cpu or cuda, got 'foo'"),
    (["--repeats", "0"], "--repeats, --baseline-repeats and --warmup must be >= 1"),
    (["--resolutions", "1"], "--resolutions values must be >= 2"),
    (["--models", "tiny-triposr", "--network-backends", "no-such-backend"], "unknown backend(s) no-such-backend"),
])
def test_bad_options_exit_2_with_an_error_line(tmp_path, capsys, args, pattern):
    with pytest.raises(SystemExit) as exc:
        S.main([*args, "--quick", "--no-plots", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {pattern}" in err and "Traceback" not in err


def test_unusable_out_directory_exits_2(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        S.main(["--models", "lrm-tiny", "--quick", "--no-plots", "--out", str(afile)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: cannot create --out directory" in err, err


def test_nothing_measured_exits_2(tmp_path):
    """Every model failing is not a benchmark result: exit 2 (partial failure stays 0, see test_cli_entry), each
    model's error on stderr; written down in a new results folder, while an earlier run's results are kept."""
    empty, broken, out = tmp_path / "empty", tmp_path / "broken", tmp_path / "out"
    empty.mkdir()
    broken.mkdir()
    (broken / "config.json").write_text("{not json")

    def bench():
        return subprocess.run([sys.executable, "-m", "lrm_rt.cli", "bench", "--models", f"{empty},{broken}", "--quick",
                               "--no-plots", "--out", str(out)], capture_output=True, text=True, cwd=REPO)

    r = bench()
    assert r.returncode == 2, r.stderr + r.stdout
    assert "error: no configuration ran successfully" in r.stderr and "Traceback" not in r.stderr
    assert f"{empty}: " in r.stderr and f"{broken}: " in r.stderr, r.stderr
    data = json.loads((out / "results.json").read_text())
    assert [e["model"] for e in data["model_errors"]] == [str(empty), str(broken)]
    (out / "results.json").write_text('{"earlier": "run"}')
    assert bench().returncode == 2
    assert json.loads((out / "results.json").read_text()) == {"earlier": "run"}


def test_unknown_model_is_a_usage_error(tmp_path):
    """A misspelt name stops before anything runs or is written (it once replaced the committed results)."""
    r = subprocess.run([sys.executable, "-m", "lrm_rt.cli", "bench", "--models", "lrm-tiny,no-such-model", "--quick",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "error: --models: unknown model 'no-such-model'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_interrupt_keeps_finished_rows(tmp_path):
    """Ctrl-C (or `timeout -s INT` on a time-limited GPU machine) writes what finished instead of nothing."""
    def interrupt(ctx):
        if ctx.src.name == "lrm-tiny":
            raise KeyboardInterrupt
        return TorchFieldBackend(), "cpu", "pymcubes"

    settings = S.settings_from_args(["--models", "tiny-triposr,lrm-tiny", "--resolutions", "16", "--batch", "1",
                                     "--repeats", "1", "--warmup", "1", "--e2e-resolution", "16", "--render-size", "8",
                                     "--network-backends", "torch-fp32", "--field-backends", "torch,stop",
                                     "--device", "cpu", "--no-plots", "--out", str(tmp_path)])
    results = S.run_suite(settings, None, {"stop": S.FieldEntry("stop", interrupt)}, log=lambda m: None)
    assert results["interrupted"] == "lrm-tiny"
    assert {r["model"] for r in results["extraction"]} == {"tiny-triposr"}
    assert json.loads((tmp_path / "results.json").read_text())["interrupted"] == "lrm-tiny"
    assert "**Interrupted** during lrm-tiny" in (tmp_path / "results.md").read_text()


def test_quick_runs_never_replace_the_full_results():
    assert S.default_out("cpu-x", quick=False) == S.BENCH_DIR / "results" / "cpu-x"
    assert S.default_out("cpu-x", quick=True) == S.BENCH_DIR / "results" / "cpu-x-quick"


def test_parity_gate_sees_connectivity_and_winding(fixtures_dir):
    """The vertex Chamfer alone passed a mesh with its faces wound inside out or scrambled over the same vertices;
    the area and signed-volume checks refuse both, and the reference-MC check (no baseline mesh) does too."""
    import trimesh

    from lrm_rt.mesh import Mesh, grid_to_world

    r = 24
    a = np.linspace(-1, 1, r)
    grid = 0.6 - np.sqrt(sum(c ** 2 for c in np.meshgrid(a, a, a, indexing="ij"))).astype(np.float32)
    v, f = S.marching_cubes(grid, 0.0, "native")
    good = Mesh(grid_to_world(np.asarray(v, np.float64), r, 1.0), f, None)
    voxel = 2 / (r - 1)
    tol = S.TOLERANCES["same_triplane"]
    assert S.parity_result(S.mesh_checks(good, good, voxel, tol))["passed"]
    area, volume = S.area_and_volume(good)
    sphere = trimesh.Trimesh(good.vertices, good.faces, process=False)
    assert area == pytest.approx(sphere.area) and volume == pytest.approx(sphere.volume) and volume > 0
    rng = np.random.default_rng(0)
    inside_out = Mesh(good.vertices, good.faces[:, ::-1].copy(), None)
    scrambled = Mesh(good.vertices, rng.integers(0, len(good.vertices), good.faces.shape), None)
    for bad in (inside_out, scrambled):
        checks = S.mesh_checks(bad, good, voxel, tol)
        assert {c["check"] for c in checks if not c["ok"]} & {"area_rel_diff", "volume_rel_diff"}, checks
        assert not S.parity_result(S.reference_mc_checks(bad, grid, 0.0, "cuda", 1.0, voxel))["passed"]
    assert S.parity_result(S.reference_mc_checks(good, grid, 0.0, "cuda", 1.0, voxel))["passed"]
