"""Every kernel instantiation compiles without a GPU: NVRTC with the options CuPy passes (the path
CuPy takes at run time) and nvcc/ptxas for sm_90 with no spills, no local memory, shared memory
and registers within the launch limits. Needs libnvrtc (pip `nvidia-cuda-nvrtc`) and nvcc; skips
cleanly without them.
"""
import pytest

from twinflow.fused import build

NVRTC = build.find_nvrtc()
NVCC = build.find_nvcc()
needs_nvrtc = pytest.mark.skipif(NVRTC is None or build.cuda_home() is None,
                                 reason="libnvrtc or CUDA headers not found (pip install 'nvidia-cuda-nvrtc==13.0.*')")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def nvrtc():
    return build.Nvrtc(NVRTC)


@pytest.fixture(scope="module")
def sm90(nvrtc):
    return build.nvrtc_compile_all(nvrtc, "90")


@pytest.fixture(scope="module")
def lowered_sm90(sm90):
    return {e: n for r in sm90.values() for e, n in r.lowered.items()}


def test_cupy_option_list_shape():
    opts = build.cupy_nvrtc_options("90", cuda_include="/opt/cuda/include")
    # CuPy's tail, in CuPy's order: -ftz=true, then the arch, then the execution-space default.
    assert opts[-3:] == ("-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")
    assert sum("-std=" in o for o in opts) == 1
    assert any(o.startswith("-I") and o.endswith("include") for o in opts)
    assert "--use_fast_math" not in opts


def test_cupy_option_list_matches_cupy_when_installed():
    import os

    core = pytest.importorskip("cupy._core.core")
    cupy_dir = os.path.dirname(os.path.dirname(core.__file__))
    theirs = [o for o in core.assemble_cupy_compiler_options(())
              if not (o.startswith("-I") and o[2:].startswith(cupy_dir))]  # CuPy's own headers
    ours = list(build.cupy_nvrtc_options("90", use_cupy=False)[:-3])
    norm = [os.path.realpath(o[2:]) if o.startswith("-I") else o for o in ours]
    assert norm == [os.path.realpath(o[2:]) if o.startswith("-I") else o for o in theirs]


@needs_nvrtc
def test_nvrtc_warning_free(sm90):
    for module, r in sm90.items():
        assert r.log.strip() == "", f"{module}.cu: {r.log}"


@needs_nvrtc
def test_every_instantiation_compiles_with_nvrtc(lowered_sm90):
    expected = {e for exprs in build.instances().values() for e in exprs}
    assert set(lowered_sm90) == expected
    assert len(expected) == 120
    # Each name expression lowered to a distinct mangled symbol (CuPy looks kernels up by these).
    assert len(set(lowered_sm90.values())) == len(expected)


@needs_nvrtc
def test_nvrtc_compiles_for_ampere_too(nvrtc):
    res = build.nvrtc_compile_all(nvrtc, "80")
    assert all(len(r.cubin) > 0 for r in res.values())


@needs_nvrtc
def test_nvrtc_check_rejects_what_only_nvcc_accepts(nvrtc):
    # NVRTC has no host C++ headers; nvcc would accept this source. The check must not be vacuous.
    src = "#include <cstdint>\n__global__ void k(int64_t* p) { p[0] = 1; }\n"
    with pytest.raises(build.CompileError, match="cstdint"):
        nvrtc.compile(src, "bad.cu", build.cupy_nvrtc_options("90"), ("k",))


@needs_nvrtc
@needs_nvcc
def test_ptxas_no_spills_and_limits(lowered_sm90):
    entries, log = build.ptxas_report(NVCC, "90")
    assert "error" not in log.lower() and "warning" not in log.lower(), log
    problems = build.check_entries(entries, lowered_sm90)
    assert problems == [], "\n".join(problems)
    # nvcc compiled exactly the instantiations NVRTC lowered (same mangled names).
    assert set(lowered_sm90.values()) <= set(entries)


def test_parse_ptxas_and_flag_spills():
    text = (
        "ptxas info    : Compiling entry function '_Z1kIfEvv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kIfEvv\n"
        "    16 bytes stack frame, 12 bytes spill stores, 44 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 1 barriers, 16 bytes cumulative stack size, 128 bytes smem\n"
        "ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1gv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 80 registers\n"
    )
    e = build.parse_ptxas(text)
    assert (e["_Z1kIfEvv"].registers, e["_Z1kIfEvv"].smem, e["_Z1kIfEvv"].spill_loads) == (32, 128, 44)
    assert (e["_Z1gv"].registers, e["_Z1gv"].smem, e["_Z1gv"].stack) == (80, 0, 0)
    problems = build.check_entries(e, {"k<float>": "_Z1kIfEvv", "ln_modulate_kernel<float, 4, 4>": "_Z1gv",
                                       "missing<int>": "_Z3zzz"})
    joined = "\n".join(problems)
    assert "spills" in joined and "stack frame" in joined
    assert "80 registers x 1024 threads" in joined  # a row kernel may launch 1024 threads
    assert "not in the ptxas report" in joined
