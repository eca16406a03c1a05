"""Every CUDA source compiles (SPEC 6): with nvcc and with NVRTC (the run-time path), for sm_90a
(H100/H200), sm_100a (B200) and sm_121a (GB10). --profile full compiles every set of defines the
launchers use; minimal a pairwise cover of them (every pair of define values in some build). No
GPU needed."""

import itertools
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from kernels import cuda_build, cuda_decode_attention, cuda_decode_loop, prefill_kv_write
from kernels.decode_plan import SM_REGISTERS
from suite.kernel_ir import resource_usage

ARCHS = ("sm_90a", "sm_100a", "sm_121a")
BUILDS = {"tma_probe": [{}], "smem_probe": [{}], "kv_write": prefill_kv_write.builds(),
          "decode_attention": cuda_decode_attention.builds(), "decode_loop": cuda_decode_loop.builds()}
ELF_MAGIC = b"\x7fELF"


def _pairs(defines):
    items = sorted(defines.items())
    return set(itertools.combinations(items, 2)) | {(item,) for item in items}


def pairwise_cover(builds):
    """A subset of builds in which every value pair of two defines (and every value) occurs."""
    needed, chosen = set().union(*map(_pairs, builds)), []
    while needed:
        best = max(builds, key=lambda b: len(_pairs(b) & needed))
        chosen.append(best)
        needed -= _pairs(best)
    return chosen or builds


def _cases(config):
    full = config.getoption("profile") == "full"
    return [(source, defines) for source, builds in BUILDS.items()
            for defines in (builds if full else pairwise_cover(builds))]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("case", cases, ids=[_id(c) for c in cases])


def _id(case):
    source, defines = case
    return "-".join([source] + [f"{k}{v}" for k, v in defines.items()])


def test_every_source_is_listed():
    assert set(BUILDS) == {p.stem for p in cuda_build.SOURCE_DIR.glob("*.cu")}


def _nvcc(case, arch, out):
    source, defines = case
    command = ["nvcc", "-cubin", f"-arch={arch}", "--std=c++17", "-Werror", "all-warnings",
               f"-I{cuda_build.SOURCE_DIR}", *(f"-D{k}={v}" for k, v in defines.items()),
               "-o", str(out), str(cuda_build.SOURCE_DIR / f"{source}.cu")]
    return command, subprocess.run(command, capture_output=True, text=True)


def _side_by_side(request, test, build):
    """build(index, case, arch) for every selected item of `test`, one thread per core (nvcc is one
    process per build, NVRTC releases the GIL): item id -> future, each test checks its own."""
    items = [i for i in request.session.items if i.module is request.module and i.originalname == test]
    pool = ThreadPoolExecutor(os.cpu_count())
    request.addfinalizer(pool.shutdown)
    return {item.callspec.id: pool.submit(build, n, item.callspec.params["case"], item.callspec.params["arch"])
            for n, item in enumerate(items)}


@pytest.fixture(scope="module")
def nvcc_builds(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nvcc")
    return _side_by_side(request, "test_nvcc_compiles", lambda n, case, arch: _nvcc(case, arch, folder / f"{n}.cubin"))


@pytest.fixture(scope="module")
def nvrtc_builds(request):
    return _side_by_side(request, "test_nvrtc_compiles",
                         lambda n, case, arch: cuda_build.nvrtc_compile(case[0], arch, case[1]))


@pytest.mark.requires_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_compiles(case, arch, nvcc_builds, request):
    command, result = nvcc_builds[request.node.callspec.id].result()
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"


@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_compiles(case, arch, nvrtc_builds, request):
    assert nvrtc_builds[request.node.callspec.id].result()[:4] == ELF_MAGIC


def test_cuda_persistent_fits_its_ctas_per_sm():
    # sm_90a: CTAS_PER_SM CTAs of THREADS threads share an SM's registers (8-register granules),
    # and nothing spills to local memory; __launch_bounds__ in decode_attention.cu promises both
    limit = SM_REGISTERS // (cuda_decode_attention.CTAS_PER_SM * cuda_decode_attention.THREADS) // 8 * 8
    for defines in pairwise_cover(cuda_decode_attention.builds()):
        usage = resource_usage(cuda_build.compile_cubin("decode_attention", "sm_90a", defines))
        assert usage["REG"] <= limit and usage["LOCAL"] == 0 and usage["STACK"] == 0, (defines, usage)


def test_a_build_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_build, "CACHE_DIR", tmp_path)
    cubin = cuda_build.compile_cubin("tma_probe", "sm_90a")
    assert [p.read_bytes() for p in tmp_path.glob("*.cubin")] == [cubin]  # one file
    monkeypatch.setattr(cuda_build, "nvrtc_compile", lambda *args: pytest.fail("the cached build was compiled again"))
    assert cuda_build.compile_cubin("tma_probe", "sm_90a") == cubin


def test_pairwise_cover_covers_every_pair():
    builds = [dict(A=a, B=b, C=c) for a in (0, 1) for b in (0, 1, 2) for c in (5, 6)]
    cover = pairwise_cover(builds)
    assert len(cover) < len(builds)
    assert set().union(*map(_pairs, cover)) == set().union(*map(_pairs, builds))


def test_build_cache_key_covers_every_input(monkeypatch):
    source = (cuda_build.SOURCE_DIR / "tma_probe.cu").read_text()
    key = cuda_build.cache_key(source, "sm_90a", {})
    assert cuda_build.cache_key(source + " ", "sm_90a", {}) != key
    assert cuda_build.cache_key(source, "sm_100a", {}) != key
    assert cuda_build.cache_key(source, "sm_90a", {"HEAD_DIM": 64}) != key
    version, files = cuda_build.nvrtc_identity()
    assert version == cuda_build.nvrtc_version() and any("libnvrtc" in path for path, _, _ in files)
    monkeypatch.setattr(cuda_build, "nvrtc_identity", lambda: ((99, 0), files))  # another CUDA: another build
    assert cuda_build.cache_key(source, "sm_90a", {}) != key
    patched = [(path, size + 1, mtime) for path, size, mtime in files]  # a patch release: same major.minor
    monkeypatch.setattr(cuda_build, "nvrtc_identity", lambda: (version, patched))
    assert cuda_build.cache_key(source, "sm_90a", {}) != key
    monkeypatch.setattr(cuda_build, "_headers", lambda: {"common.cuh": b"changed"})
    assert cuda_build.cache_key(source, "sm_90a", {}) != key


def test_compile_error_raises_with_the_log(tmp_path, monkeypatch):
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void broken() { undeclared(); }\n')
    monkeypatch.setattr(cuda_build, "SOURCE_DIR", tmp_path)
    monkeypatch.setattr(cuda_build, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(cuda_build.CudaError, match="undeclared"):
        cuda_build.compile_cubin("broken", "sm_90a")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("capability,arch", [((9, 0), "sm_90a"), ((10, 0), "sm_100a"), ((8, 9), "sm_89")])
def test_arch_for(capability, arch):
    assert cuda_build.arch_for(capability) == arch
