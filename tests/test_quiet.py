"""The entry points drop the third-party notes a user cannot act on, and nothing else."""
import logging
import subprocess
import sys
import warnings

from diffusion_ao.quiet import DROPPED_LOG_MESSAGES, quiet_third_party

NOISE = ("Failed to load", "register_constant", "Unable to import `torchao` Tensor objects", "Detected no triton")


def test_dropped_messages_are_dropped_and_others_kept(caplog):
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter per logger
    assert all(sum(type(f).__name__ == "_DropMessages" for f in logging.getLogger(n).filters) == 1
               for n in DROPPED_LOG_MESSAGES)
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logging.getLogger("torch.utils._pytree").warning(
            "<enum 'K'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type.")
        logging.getLogger("torchao").warning("a torchao warning about the user's model")
    assert [r.getMessage() for r in caplog.records] == ["a torchao warning about the user's model"]


def test_library_deprecations_are_ignored_but_not_the_users():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn_explicit("old API", DeprecationWarning, "torchao/x.py", 1, module="torchao.x")
        warnings.warn_explicit("my deprecation", DeprecationWarning, "mine.py", 1, module="mine")
    assert [str(w.message) for w in caught] == ["my deprecation"]


def test_import_diffusion_ao_loads_no_submodule_until_used():
    code = ("import sys, diffusion_ao, diffusion_ao.quiet\n"
            "assert 'torch' not in sys.modules and 'torchao' not in sys.modules, 'eager import'\n"
            "from diffusion_ao import QuantConfig\n"
            "assert diffusion_ao.QuantConfig is QuantConfig and diffusion_ao.graph.MAX_BATCH\n"
            "assert sorted(diffusion_ao.__all__) == diffusion_ao.__all__ and 'quantize_pipeline' in dir(diffusion_ao)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_cli_and_the_bench_start_quietly():
    for command in ([sys.executable, "-m", "diffusion_ao.quantize_cli", "--help"],
                    [sys.executable, "bench/run.py", "--help"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        noise = [line for line in (done.stdout + done.stderr).splitlines() if any(n in line for n in NOISE)]
        assert not noise, f"{command[1:]} printed: {noise}"
