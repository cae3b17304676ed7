"""Shared pytest setup.

TRITON_INTERPRET must be set before any @triton.jit kernel module is imported (Triton reads it at decoration
time), so it is set here, at import. setdefault: `TRITON_INTERPRET=0 pytest` on a GPU box runs the kernel tests
on CUDA with compiled kernels instead of the interpreter on CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
import sysconfig
from pathlib import Path

import pytest

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
