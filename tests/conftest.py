"""Shared pytest setup.

The suite is the CPU suite everywhere, a GPU box included (docs/verification.md): the GPUs are hidden and Triton
is interpreted, so `make test` tests there what CI tests, and never half the GPU path by accident (training on the
GPUs with interpreted kernels). GPU coverage is `make gpu-check`. Both variables are set here, at import: Triton
reads TRITON_INTERPRET when a @triton.jit kernel module is imported, and torch reads CUDA_VISIBLE_DEVICES when it
initialises CUDA; children (training runs, the evaluator) inherit them. `TRITON_INTERPRET=0 pytest ...`, set on
purpose (gpu-check runs tests/test_kernels.py so), keeps the GPUs: the kernel tests then run compiled on CUDA.

Tests marked `sandbox` need bubblewrap. Where it is missing or cannot build a sandbox they are skipped with the
reason and the install line, and the run ends with one loud line that counts them; with RATCHET_REQUIRE_SANDBOX=1
(CI) that is an error instead, so the sandbox tier always runs there.
"""

import os


def cpu_suite(environ) -> bool:
    """Make `environ` the CPU suite's (Triton interpreted, no GPU visible) unless TRITON_INTERPRET says otherwise (0);
    True when it did."""
    if environ.setdefault("TRITON_INTERPRET", "1") != "1":
        return False
    environ["CUDA_VISIBLE_DEVICES"] = ""
    return True


CPU_SUITE = cpu_suite(os.environ)

import shutil
import sysconfig
from pathlib import Path

import pytest

from agent.guard import sandbox
SANDBOX_SKIPPED = pytest.StashKey[tuple]()  # (tests skipped, why) when the sandbox tier could not run

# stdlib modules that make a ~1.6 MB corpus: enough for a 4096-token BPE and an evaluator's val slice
CORPUS_MODULES = ["argparse", "ast", "calendar", "collections/__init__", "configparser", "dataclasses", "datetime",
                  "decimal", "difflib", "enum", "fractions", "functools", "inspect", "ipaddress", "logging/__init__",
                  "pathlib", "pickle", "pprint", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap",
                  "threading", "typing", "zipfile", "heapq", "bisect", "tempfile", "random", "shlex", "glob",
                  "fnmatch", "csv", "json/decoder", "json/encoder", "locale", "gettext", "optparse", "pydoc",
                  "doctest", "mailbox", "smtplib", "imaplib", "ftplib", "http/client", "http/server", "urllib/parse",
                  "urllib/request", "uuid", "weakref", "abc", "codecs", "contextlib", "copy", "traceback", "warnings"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small textdir dataset (vocab 4096, like cpu-test) built once per session with the real prepare code."""
    from nanomodel.prepare import prepare

    src = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_MODULES:
        shutil.copy(stdlib / f"{name}.py", src / (name.replace("/", "_") + ".py"))
    return prepare("textdir", root=tmp_path_factory.mktemp("data"), path=src, name="testcorpus")


def pytest_report_header(config):
    if CPU_SUITE:
        return "ratchet: the CPU suite: GPUs hidden (CUDA_VISIBLE_DEVICES=''), Triton interpreted; GPUs: make gpu-check"
    return "ratchet: TRITON_INTERPRET=0: GPUs visible, Triton compiled (the GPU run of `make gpu-check`)"


def pytest_collection_modifyitems(config, items):
    needs_sandbox = [item for item in items if item.get_closest_marker("sandbox")]
    ok, why = sandbox.available() if needs_sandbox else (True, "")
    if ok:
        return
    if os.environ.get("RATCHET_REQUIRE_SANDBOX") == "1":
        raise pytest.UsageError(f"RATCHET_REQUIRE_SANDBOX=1, but {len(needs_sandbox)} sandbox tests cannot run: {why}")
    for item in needs_sandbox:
        item.add_marker(pytest.mark.skip(reason=f"needs the sandbox: {why}"))
    config.stash[SANDBOX_SKIPPED] = (len(needs_sandbox), why)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SANDBOX_SKIPPED in config.stash:
        count, why = config.stash[SANDBOX_SKIPPED]
        terminalreporter.write_line(f"SANDBOX TESTS DID NOT RUN: {count} skipped: {why}", red=True, bold=True)
