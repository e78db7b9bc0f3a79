"""Test harness: 8 fake CPU devices (set before jax is imported) and shared helpers."""

import os
import sys

# XLA compiles the tests' programs for compile time, not run time: compilation is most
# of the suite's time and the programs are small (benchmarks/RESULTS.md has the numbers).
# Without LLVM's optimisations, with XLA:CPU's classic kernel emitter instead of its MLIR
# fusion emitters, LLVM's module kept in one piece without its expensive passes, and dots
# on XLA's own kernels instead of XNNPACK's, they compile faster and run about as fast.
# All leave the HLO as it is (no fast-math); where a multiply and an add are fused into
# one multiply-add differs between the settings, which can move the last bit of a
# float32 result, so a test that compares two different programs does it in float64
# (test_accumulation's MultiSteps check). The notebooks' kernels inherit these flags.
_UNOPTIMISED = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    " --xla_cpu_parallel_codegen_split_count=1 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_xnnpack=false"
)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {_UNOPTIMISED}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole run, shared by the xdist workers, the notebook
# kernels and the subprocess tests: many tests compile the same step of the same
# optimizer on the same tree (a device path and the no-recompile check, a demo recipe in
# a test and in a notebook), and XLA's compile time is most of the suite's time. The
# cache is keyed by the program, the JAX version and the XLA flags, so it never changes
# a result; set JAX_COMPILATION_CACHE_DIR yourself to move it.
_CACHE = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax-compilation")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(__file__))  # makes `import helpers` work everywhere

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import x64  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py must run before jax is imported"


@pytest.fixture
def float64():
    """float64 inside the test: two routes to the same arithmetic agree to 1e-12."""
    with x64():
        yield
