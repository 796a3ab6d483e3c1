"""The build itself: compiled kernels really run (a broken build must not pass as the reference
fallback), the fallback works with one warning, torch.compile traces the ops, and the wheel
installs and runs outside the source tree."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest
import torch

import megapre.ops as ops

ROOT = Path(__file__).resolve().parents[2]
OPS = ["norm_fwd", "norm_bwd", "scale_mask_softmax_fwd", "scale_mask_softmax_bwd",
       "quantize_rowwise", "int8_gemm", "weight_only_int8_gemm"]


def test_compiled_cpu_kernels_loaded():
    info = ops.backend_info()
    assert info["cpu"] == "compiled", f"megapre._C did not load: {info['errors']}"
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"megapre::{name}", "CPU"), name


@pytest.mark.skipif(os.environ.get("MEGAPRE_BUILD_CUDA") != "1",
                    reason="CUDA build not requested (MEGAPRE_BUILD_CUDA != 1)")
def test_compiled_cuda_kernels_loaded():
    info = ops.backend_info()
    assert info["cuda_library"], f"megapre._C_cuda did not load: {info['errors']}"
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"megapre::{name}", "CUDA"), name


def test_ops_dispatch_to_compiled_kernels():
    """The profiler sees megapre:: ops (not the reference's aten ops) for each public call."""
    x = torch.randn(8, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    wq, ws = ops.quantize_per_channel(torch.randn(16, 64))
    with torch.profiler.profile() as prof:
        ops.layer_norm(x, w, None).sum().backward()
        ops.scale_mask_softmax(torch.randn(1, 2, 4, 4), causal=True)
        ops.int8_linear(x.detach(), wq, ws)
        ops.weight_only_int8_linear(x.detach(), wq, ws)
    seen = {e.name for e in prof.events()}
    for name in OPS:
        if name != "scale_mask_softmax_bwd":
            assert f"megapre::{name}" in seen, (name, sorted(n for n in seen if "megapre" in n))


def test_cpu_isa_switch():
    import megapre._C as C

    ops.set_cpu_isa("scalar")
    assert ops.cpu_isa() == "scalar"
    ops.set_cpu_isa("auto")
    best = "avx512vnni" if C.cpu_has_avx512vnni() else ("avx2" if C.cpu_has_avx2() else "scalar")
    assert ops.cpu_isa() == best
    with pytest.raises(ValueError, match="expected 'auto', 'scalar' or 'avx2'"):
        ops.set_cpu_isa("sse9")


FALLBACK_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, warnings, torch

    class MissingLibraries(importlib.abc.MetaPathFinder):
        # First on sys.meta_path: the compiled libraries cannot be found whatever the install mode
        # (setuptools' editable finders sit after the path finder and would still find them).
        def find_spec(self, name, path=None, target=None):
            if name in ("megapre._C", "megapre._C_cuda"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, MissingLibraries())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import megapre.ops as ops
        from megapre.ops import reference as ref
        x = torch.randn(4, 32, requires_grad=True)
        y, s = ops.layer_norm(x, torch.ones(32), None, residual=torch.randn(4, 32))
        y.sum().backward()
        p = ops.scale_mask_softmax(torch.randn(1, 1, 3, 3), causal=True)
        wq, ws = ops.quantize_per_channel(torch.randn(8, 32))
        ops.int8_linear(x.detach(), wq, ws); ops.weight_only_int8_linear(x.detach(), wq, ws)
        ops.rms_norm(x, None)
        g = ops.bias_gelu(x, torch.zeros(32))
        assert torch.equal(g, ref.bias_gelu(x, torch.zeros(32)))
    msgs = [str(w.message) for w in caught if "megapre" in str(w.message)]
    assert ops.backend() == "reference", ops.backend()
    assert len(msgs) == 1, msgs
    assert "pip install --no-build-isolation" in msgs[0], msgs[0]
    assert torch.allclose(p[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    print("fallback ok")
""")


def test_reference_fallback_without_compiled_library(tmp_path):
    """A missing compiled library means reference ops plus exactly one warning saying how to build."""
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=tmp_path, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fallback ok" in out.stdout


def test_torch_compile_fullgraph():
    """Fake + autograd registrations let dynamo/AOTAutograd trace the ops end to end."""
    torch._dynamo.reset()
    w = torch.randn(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    wq, ws = ops.quantize_per_channel(torch.randn(32, 64))

    def block(x, r, scores, mask):
        y, s = ops.layer_norm(x, w, b, residual=r)
        z = ops.rms_norm(ops.bias_gelu(y, b), w)
        p = ops.scale_mask_softmax(scores, mask, scale=0.5, causal=True)
        q = ops.int8_linear(z.detach(), wq, ws) + ops.weight_only_int8_linear(z.detach(), wq, ws)
        return z.sum() + s.sum() + (p * scores).sum() + q.sum() * 0

    args = [torch.randn(6, 64, requires_grad=True), torch.randn(6, 64, requires_grad=True),
            torch.randn(2, 3, 5, 7, requires_grad=True), torch.rand(2, 1, 5, 7) > 0.7]
    eager = block(*args)
    eager_grads = torch.autograd.grad(eager, [args[0], args[1], args[2], w, b])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    grads = torch.autograd.grad(out, [args[0], args[1], args[2], w, b])
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_inductor_norm():
    torch._dynamo.reset()
    ln = ops.LayerNorm(128)
    fn = torch.compile(lambda x: ln(x).square().mean(), fullgraph=True)
    x = torch.randn(32, 128, requires_grad=True)
    loss = fn(x)
    loss.backward()
    ref_x = x.detach().clone().requires_grad_()
    ops.reference.layer_norm(ref_x, ln.weight, ln.bias).square().mean().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)


WHEEL_CHECK = textwrap.dedent("""
    import os, torch, megapre, megapre.ops as ops
    from megapre.ops import reference as ref
    assert os.environ["VIRTUAL_ENV"] in megapre.__file__, megapre.__file__
    assert torch.__file__ == os.environ["BUILT_WITH_TORCH"], (torch.__file__, os.environ["BUILT_WITH_TORCH"])
    assert ops.backend_info()["cpu"] == "compiled", ops.backend_info()
    torch.manual_seed(0)
    x = torch.randn(5, 48); w = torch.randn(48); b = torch.randn(48)
    torch.testing.assert_close(ops.layer_norm(x, w, b), ref.layer_norm(x, w, b), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w), ref.rms_norm(x, w), rtol=1e-4, atol=1e-5)
    s = torch.randn(2, 2, 5, 5); m = torch.rand(2, 1, 5, 5) > 0.5
    torch.testing.assert_close(ops.scale_mask_softmax(s, m, 0.3, True), ref.scale_mask_softmax(s, m, 0.3, True))
    wt = torch.randn(16, 48)
    wq, ws = ops.quantize_per_channel(wt)
    rq, rs = ref.quantize_per_channel(wt)
    assert torch.equal(wq, rq) and torch.equal(ws, rs)
    torch.testing.assert_close(ops.int8_linear(x, wq, ws, b[:16]), ref.int8_linear(x, wq, ws, b[:16]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ops.weight_only_int8_linear(x, wq, ws), ref.weight_only_int8_linear(x, wq, ws), rtol=1e-4, atol=1e-4)
    print("wheel ok", megapre.__file__)
""")


def _source_copy(dst: Path) -> Path:
    """The tracked files only (what a fresh clone has), so no stale build output leaks in."""
    if (ROOT / ".git").exists():
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, text=True,
                               capture_output=True, check=True).stdout.split()
        for f in files:
            if (ROOT / f).is_file():
                (dst / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, dst / f)
    else:
        shutil.copytree(ROOT, dst, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("build", "*.so", "__pycache__", "*.egg-info"))
    return dst


@pytest.mark.slow
def test_wheel_builds_installs_and_runs(tmp_path):
    src = _source_copy(tmp_path / "src")
    env = {**os.environ, "MEGAPRE_BUILD_CUDA": "0", "MAX_JOBS": "2"}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                            "-w", str(tmp_path / "dist"), str(src)], env=env, text=True, capture_output=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("megapre-*.whl")
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(tmp_path / "venv")
    py = tmp_path / "venv" / "bin" / "python"
    # a venv sees the base interpreter's packages only: where this suite runs in a virtualenv, the
    # torch the wheel was built against (and pip, numpy) live in that one, so add its site-packages
    # (plain paths, after the new venv's own: its .pth hooks, e.g. an editable megapre, stay off)
    site_dir = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              text=True, capture_output=True, check=True).stdout.strip()
    outer = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    Path(site_dir, "outer_site_packages.pth").write_text("".join(f"{d}\n" for d in outer))
    inst = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", str(wheel)], text=True, capture_output=True)
    assert inst.returncode == 0, inst.stderr[-3000:]
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_env["VIRTUAL_ENV"] = str(tmp_path / "venv")
    run_env["BUILT_WITH_TORCH"] = torch.__file__
    out = subprocess.run([str(py), "-c", WHEEL_CHECK], cwd=tmp_path, env=run_env, text=True, capture_output=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "wheel ok" in out.stdout
